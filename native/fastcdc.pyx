# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""FastCDC content-defined chunking: the scan kernel of p2pfs (format ``fastcdc-gear-v1``).

This module only finds cut points; p2pfs/chunker.py is its one user and owns the
public API, the pure-Python twin and the parameter checks. The format is
specified in docs/chunking.md; in short, for a chunk starting at offset s of a
stream of n remaining bytes:

* if n <= min_size the rest is one chunk; otherwise the scan ends at
  e = min(n, max_size) and the "normal" point is m = min(avg_size, e);
* the gear hash h starts at 0 and takes bytes from s + min_size on (the first
  min_size bytes of a chunk are skipped, never hashed):
  h = ((h << 1) + GEAR[byte]) mod 2**64;
* after taking the byte at chunk-relative index i, the chunk is cut at i + 1
  if h & mask == 0, where mask = MASK_S for i < m and MASK_L for i >= m;
* if no cut is found, the chunk is e bytes long.

Masks (normalized chunking, level 2 of the FastCDC paper): with
b = log2(avg_size) (avg_size is a power of two), MASK_S has b + 2 one bits and
MASK_L has b - 2, each one contiguous run ending at bit 62:
mask(k) = ((1 << k) - 1) << (63 - k). High bits are used because bit j of h
depends on the last j + 1 bytes only; bit 63 is left out so that the
two-bytes-per-iteration loop below (FastCDC 2020) is exact.

The gear table is the first 2048 bytes of the BLAKE3 extendable output of
b"p2pfs fastcdc-gear-v1", read as 256 little-endian uint64 values; it is
written out below and checked against that derivation by the tests and by
p2pfs.chunker.self_test().

Speed-ups that keep the cut points exact: two bytes per loop step (_scan1) and
two interleaved lanes over adjacent blocks (_scan); see docs/chunking.md.
"""

from libc.stdint cimport uint8_t, uint64_t

cdef extern from *:
    """
    static const unsigned long long P2PFS_GEAR[256] = {
    0x3e7feb82a9ff01ccULL, 0xfd173514ef9ac752ULL, 0x1698337da400e39cULL, 0x53004952990e7debULL,
    0x763bdb04cf7ed4b2ULL, 0x3d1be1439618688dULL, 0x3b6eebaf889b30e6ULL, 0xbaa8403cf8429669ULL,
    0x626c767f105ead67ULL, 0xcf418c59725462fbULL, 0x73aa44e6606ac683ULL, 0xb5c3737e16528d07ULL,
    0xc02fe6c0914766feULL, 0x04d223de137e3745ULL, 0x1cfcd1e1efef6befULL, 0xd12482ddf6523956ULL,
    0x7ef862cb51f12b14ULL, 0x0ddd9ad2f18b3c95ULL, 0x95bf12150686425aULL, 0x6e5c1601a1dbaa20ULL,
    0xd5cf1387e61b708aULL, 0xea6503aa5c783726ULL, 0x4ad9c6c14dcfc6b7ULL, 0xfa7e04c80651a2c1ULL,
    0x1e288a06c9f535bcULL, 0xe961d38169238e89ULL, 0xe3c2301a1e3de255ULL, 0x764da3729c6afa8bULL,
    0x4f574c57f0026b4aULL, 0x3c9f81e4d237f8fcULL, 0x143ae0c769750c7cULL, 0xd2bf66ae3cc2b5d4ULL,
    0x0b3016aececa2c15ULL, 0x3eff2dc6f0809315ULL, 0x876ebc12081b5166ULL, 0xa478909974b30058ULL,
    0xff65b28699ec4ceaULL, 0xbb99884b3052a25cULL, 0xe18f51e933c24da4ULL, 0xdaaec6c9ad871924ULL,
    0x71877a164caee59dULL, 0x3b776f48a4e06ddbULL, 0x338598bd6340b47eULL, 0xad9d0c86dd17180bULL,
    0x9a6dc7e491c89613ULL, 0x0e9dde90c9f09624ULL, 0x3cded69c40ae78a0ULL, 0x7290cba3cab77931ULL,
    0xe8682c14e0599405ULL, 0xef5eda38c65090e6ULL, 0xaa786b6c0a41cfc7ULL, 0x027aaf1cf9595e16ULL,
    0x68a0a54fe8e89c82ULL, 0x4bbb012f6d04d24cULL, 0x8c8c8a9a0894ec4aULL, 0x3793b4ebffb34097ULL,
    0xacde036d93cf3f07ULL, 0xbb1c95a9146607b1ULL, 0xb27c2672326aaf87ULL, 0x1b276a7ff73c8ecbULL,
    0x6352b7035db93442ULL, 0x4a2f50aeb9aef990ULL, 0x251adefa0b250e2aULL, 0x62cfc11d184c9600ULL,
    0xf74aa2b98e791cacULL, 0x20e5fc6467499074ULL, 0xe8236a1f51501ec2ULL, 0x31692803b39e49b1ULL,
    0x358ce6f212b3d7a6ULL, 0x42c3228296f039e3ULL, 0x84f09bdb96d6776fULL, 0x50fd4d3f9b402b0aULL,
    0x6f5162baf932a068ULL, 0xf40daa090e7b61c6ULL, 0xccfcf8d603a0e735ULL, 0x5036d3f7ca396396ULL,
    0xdd0ab82c6861da16ULL, 0x9aa283e6567d3689ULL, 0x975d916d6cd8ae3bULL, 0xd3e3a395999fa872ULL,
    0x8d1bd343fc680ca3ULL, 0x2f205653f1d0b5f9ULL, 0x4ab815d928edbc8aULL, 0x03f43a89d04bed33ULL,
    0xafe403d1a7ad6a63ULL, 0x719c72875aab4a54ULL, 0xb60329aa97b7ea17ULL, 0xc6e3b375ce39ea55ULL,
    0x3cfcbd65686332e1ULL, 0xb919107fa4091527ULL, 0x321a25972f4d6fabULL, 0xe62a260ed94a3d51ULL,
    0x8458ca691a8959d1ULL, 0xbb481be817cd3e67ULL, 0x7158facf77f4406aULL, 0x5a57c1a92bec43b7ULL,
    0x7ab09401e33bbc65ULL, 0x56acc0a5fa38b312ULL, 0x95a79b0dec6cdb9bULL, 0x11dd64a8dca312d8ULL,
    0xf5e69e2a4d6a559cULL, 0x6c88dcdbf828ac0fULL, 0x41441afec7d8d569ULL, 0x031e61a05b327d5dULL,
    0xb035de51c8a1f420ULL, 0xafe5f97892df38f8ULL, 0x9bfb20d3436399a1ULL, 0x8664dad6b9c58331ULL,
    0x3325ed6d3529e542ULL, 0xb490478b07ede833ULL, 0x77802103e740b6b9ULL, 0xcd396e32df787fcbULL,
    0x11932975d0c41323ULL, 0xd1b8d93363348eb7ULL, 0xa6a17e16deba9d40ULL, 0xe66644dac2ddd3f5ULL,
    0x025e3617e38f7b10ULL, 0x9782d1e267a181c9ULL, 0x1109f22b52bee626ULL, 0x691050ce313b2360ULL,
    0x75306bd11accfde5ULL, 0x4a733f9de0ac9fa4ULL, 0x87289264639b13beULL, 0x8556b97fb78b5f8eULL,
    0x875977c960993695ULL, 0x9f8bd0f2cec66e6bULL, 0xc91c7cd37e0f3f80ULL, 0x92c8e4f865c3e319ULL,
    0x1f49cf28033b8ca6ULL, 0xdca1d172a726d061ULL, 0x01e0aae7382659c4ULL, 0xea791b7aac5e9a4fULL,
    0xf61dc73c1d1158e7ULL, 0x5ebb878885301755ULL, 0xbac13fbe0eb20998ULL, 0xafd8d1dc2fbf7917ULL,
    0xda5f92f6bb8f9a74ULL, 0x1293f7dfee30624dULL, 0x540290ba3fa0d39bULL, 0x233767a021cadbabULL,
    0x4627d576fa1c1b50ULL, 0x075d8cd9e08e0115ULL, 0x1e2f5fe03833c8d3ULL, 0x4e80d7dc383e6eb6ULL,
    0x505b92043fbbec87ULL, 0x01de288cefa03f1aULL, 0xe4c5f257f761de8fULL, 0xe714fd5ed66f024cULL,
    0xc49024941448b8cdULL, 0x9e8615b92c20540eULL, 0xbebde78d79236d3aULL, 0xd09b0b26e45c3e13ULL,
    0x7e31525115bde155ULL, 0xe72cee36af4188b3ULL, 0x2f35d0077c07b1e0ULL, 0x957c7db714c5567aULL,
    0xdee5feac8fad6118ULL, 0x58b437ce98ae8599ULL, 0xbe3cdfd8b018216bULL, 0xd1a083f071c8ef93ULL,
    0x07570aedd2d63097ULL, 0x3a735f373e5d7970ULL, 0x92bc6e4cfe821904ULL, 0x39a802ce19bf3d80ULL,
    0xbfa5231d7640a6adULL, 0x2fbaff06aace0cabULL, 0xebf09593e79e8912ULL, 0x580360b232979e8dULL,
    0x3e63f47fd1020faaULL, 0xc5be838f22114e28ULL, 0x2bdf9d40b2ad4bb0ULL, 0x3fa7881d8b60218aULL,
    0xc5acf3df5eac1990ULL, 0xca1fa883126669caULL, 0x574c7682ebab1147ULL, 0x129503d760c78ee6ULL,
    0x9cba4f8d24400c20ULL, 0x18ca3edf3c637f62ULL, 0xf3bb26ed659710bbULL, 0x7137be38eaff40aaULL,
    0x6ee1cf2c775d0c7dULL, 0x4371103b3667a7efULL, 0x3be288dac5eaf68eULL, 0x8b1acfaca0de81dfULL,
    0x9b61b2e88cb0e851ULL, 0x791330aba3b037dcULL, 0x05ea0ab2774c7bd9ULL, 0x1f44eee5dc177418ULL,
    0x2c74618631941a9bULL, 0xd65bb3958f3dc55fULL, 0xa13a4d5cccc65364ULL, 0xa89273fec4c7fa03ULL,
    0xc29354c4daac13b9ULL, 0xfe3f949a136fc686ULL, 0x0964edd93173d4c6ULL, 0xcf079ef987cad8e8ULL,
    0x1a734f9ec0add541ULL, 0xf6cb51290f1bf4a4ULL, 0xae33a3dd5200c607ULL, 0x7455f8c9c6fe1c87ULL,
    0x45d49bd21edd3e0fULL, 0xb23fbe94309052d8ULL, 0x3715c176b0b2e560ULL, 0xfd605846be182c06ULL,
    0xe76de34020d94a32ULL, 0xca88776cada98a31ULL, 0x49e8ba54b654d745ULL, 0xc5d17ea6fef5cec1ULL,
    0x53c58bdc3c4c182eULL, 0x466f525a5e7b8faeULL, 0x3319641833b68641ULL, 0x5348c563076be9f2ULL,
    0x865a9eac48a9b795ULL, 0xc4d0420ad4b68238ULL, 0xd167378eb5b86359ULL, 0x83aa23bd27658fbdULL,
    0x16445030816258dbULL, 0x0c86446050176cc4ULL, 0xdcf57d338809963dULL, 0x0263c8bfa25ff308ULL,
    0x521288419125b285ULL, 0xdc67a82fd67450aaULL, 0x62850d2f8fe5ad4aULL, 0x18b1a44b19bc902fULL,
    0xf6fd029c91757385ULL, 0x68f917b2ef9dd122ULL, 0x1499b3980b26710aULL, 0xedd0117d84045980ULL,
    0x907c395c3267321bULL, 0xcf7abfc53dba0aefULL, 0x1224965295414ca8ULL, 0x515a94d57d783569ULL,
    0x3be26eb74df98effULL, 0x5721b21efb6cd1afULL, 0x06fc17c5deedfaf8ULL, 0xa1e5ceaad50d76c0ULL,
    0x0e3c4c350f5fc365ULL, 0xc17a3bd3bc5e8132ULL, 0x71e8a60a0feef740ULL, 0xb863a2e951dde37dULL,
    0x330ce52f78afd157ULL, 0x0f5042925c377ecbULL, 0x31862ebc72cb0359ULL, 0xdd8a2ab32f69c443ULL,
    0x9e36de83100f25f5ULL, 0xe776c60c2a98006fULL, 0x73ffc6130a990694ULL, 0xb6ecbd8d22717b72ULL,
    0x2747217b7b575cb8ULL, 0xfec75df82911b334ULL, 0xc6ce1b2f16951c28ULL, 0x588420fb5ea8d8b2ULL,
    0x64d11b3cbb554e74ULL, 0xfcb947efabfa1f7eULL, 0xf851fa12ed35cb08ULL, 0x7e3c29c62c41dddeULL,
    };
    """
    const unsigned long long P2PFS_GEAR[256]

# GEAR shifted left by one, for the two-bytes-per-iteration loop. Filled once at import.
cdef uint64_t GEAR_LS[256]
cdef int _k
for _k in range(256):
    GEAR_LS[_k] = (<uint64_t>P2PFS_GEAR[_k]) << 1


cdef inline uint64_t _mask(unsigned int bits) noexcept nogil:
    return ((<uint64_t>1 << bits) - 1) << (63 - bits)


cdef inline size_t _scan1(const uint8_t *p, size_t i, size_t end, uint64_t h,
                          uint64_t mask) noexcept nogil:
    """Feed bytes p[i:end] to the hash h (the hash after p[i - 1]); return the
    chunk length at the first cut, or 0 if there is none."""
    cdef uint64_t mask_ls = mask << 1   # exact because bit 63 of mask is 0
    # Two bytes per iteration (FastCDC 2020): after the first byte h holds
    # (hash << 1), tested against mask << 1; adding the second byte's gear value
    # completes the true hash. Same cut points as one byte at a time.
    while i + 2 <= end:
        h = (h << 2) + GEAR_LS[p[i]]
        if (h & mask_ls) == 0:
            return i + 1
        h = h + P2PFS_GEAR[p[i + 1]]
        if (h & mask) == 0:
            return i + 2
        i += 2
    if i < end:
        h = (h << 1) + P2PFS_GEAR[p[i]]
        if (h & mask) == 0:
            return i + 1
    return 0


cdef inline uint64_t _warm(const uint8_t *p, size_t hs, size_t i) noexcept nogil:
    """The hash after p[i - 1], for a hash that started at p[hs]. Bytes more than
    64 positions back are shifted out of a 64-bit hash, so the last 64 suffice."""
    cdef size_t j = hs if i < hs + 64 else i - 64
    cdef uint64_t h = 0
    while j < i:
        h = (h << 1) + P2PFS_GEAR[p[j]]
        j += 1
    return h


# The two-lane scan hashes two adjacent blocks in one loop, so that their two
# dependency chains (a shift and an add per byte) overlap. The block size does not
# change the cut points, only speed: avg_size / 16 within [2 KiB, 16 KiB] measured
# best (a candidate costs a rescan of two blocks; a block costs 2 x 64 warm-up bytes).


cdef inline size_t _scan(const uint8_t *p, size_t hs, size_t i, size_t end,
                         uint64_t mask, size_t block) noexcept nogil:
    """First cut in p[i:end] for a hash started at p[hs] (hs <= i), or 0.

    Same result as _scan1: the span is cut into pairs of adjacent blocks, each
    block's hash warmed up from the 64 bytes before it, and the two blocks of a
    pair hashed in one interleaved loop. When either lane sees a candidate, the
    pair is rescanned one lane at a time, which finds the earliest cut exactly.
    """
    cdef uint64_t mask_ls = mask << 1
    cdef uint64_t ha, hb, ha2, hb2
    cdef const uint8_t *pa
    cdef const uint8_t *pb
    cdef size_t k, r
    cdef int hit
    while i + 2 * block <= end:
        ha = _warm(p, hs, i)
        hb = _warm(p, hs, i + block)
        pa = p + i
        pb = p + i + block
        hit = 0
        k = 0
        while k < block:
            ha = (ha << 2) + GEAR_LS[pa[k]]
            hb = (hb << 2) + GEAR_LS[pb[k]]
            ha2 = ha + P2PFS_GEAR[pa[k + 1]]
            hb2 = hb + P2PFS_GEAR[pb[k + 1]]
            if ((ha & mask_ls) == 0 or (hb & mask_ls) == 0
                    or (ha2 & mask) == 0 or (hb2 & mask) == 0):
                hit = 1
                break
            ha = ha2
            hb = hb2
            k += 2
        if hit:
            r = _scan1(p, i, i + 2 * block, _warm(p, hs, i), mask)
            if r:
                return r
        i += 2 * block
    return _scan1(p, i, end, _warm(p, hs, i), mask)


cdef inline size_t _cut(const uint8_t *p, size_t n, size_t min_size, size_t avg_size,
                        size_t max_size, uint64_t mask_s, uint64_t mask_l,
                        size_t block) noexcept nogil:
    """Length of the chunk that starts at p, given n bytes are left in the stream."""
    cdef size_t end, normal, r
    if n <= min_size:
        return n
    end = max_size if n > max_size else n
    normal = avg_size if avg_size < end else end
    r = _scan(p, min_size, min_size, normal, mask_s, block)
    if r:
        return r
    r = _scan(p, min_size, normal, end, mask_l, block)
    if r:
        return r
    return end


cdef class Cutter:
    """Validated parameters and derived masks (p2pfs.chunker checks the values)."""

    cdef size_t min_size, avg_size, max_size, block
    cdef uint64_t mask_s, mask_l
    cdef readonly unsigned int bits

    def __cinit__(self, size_t min_size, size_t avg_size, size_t max_size):
        cdef unsigned int b = 0
        if not (64 <= min_size < avg_size < max_size <= (64 << 20)):
            raise ValueError("need 64 <= min_size < avg_size < max_size <= 64 MiB")
        if avg_size & (avg_size - 1):
            raise ValueError("avg_size must be a power of two")
        while (<size_t>1 << b) < avg_size:
            b += 1
        self.bits = b
        self.min_size = min_size
        self.avg_size = avg_size
        self.max_size = max_size
        self.mask_s = _mask(b + 2)
        self.mask_l = _mask(b - 2)
        self.block = min(max(avg_size // 16, <size_t>2048), <size_t>16384)

    @property
    def masks(self):
        return (self.mask_s, self.mask_l)

    def cut(self, const uint8_t[::1] data not None, bint eof):
        """Length of the first chunk of ``data`` (a chunk start), or 0 if more bytes
        are needed: without ``eof``, a cut is only final with max_size bytes in view."""
        cdef size_t n = <size_t>data.shape[0]
        cdef size_t r
        if n == 0 or (not eof and n < self.max_size):
            return 0
        with nogil:
            r = _cut(&data[0], n, self.min_size, self.avg_size, self.max_size,
                     self.mask_s, self.mask_l, self.block)
        return r

    def cut_points(self, const uint8_t[::1] data not None):
        """End offsets of every chunk of ``data`` taken as a whole stream."""
        cdef size_t n = <size_t>data.shape[0]
        cdef size_t pos = 0, r
        cdef const uint8_t *p
        out = []
        if n == 0:
            return out
        p = &data[0]
        while pos < n:
            with nogil:
                r = _cut(p + pos, n - pos, self.min_size, self.avg_size, self.max_size,
                         self.mask_s, self.mask_l, self.block)
            pos += r
            out.append(pos)
        return out


def gear_table():
    """The 256 gear values, for checking against their derivation."""
    return [<uint64_t>P2PFS_GEAR[i] for i in range(256)]
