"""TLS over a trio socket, with a lean read path for bulk transfers.

trio's SSLStream is careful and general, but OpenSSL hands back one 16 KiB TLS
record per read, and each trip through SSLStream's Python machinery cost more
than decrypting the record: a peer read ran at ~90 MB/s with the event loop
busy. Here a receive takes everything the socket has (up to 1 MiB) and drains
every complete record in one tight loop of C calls.

Only what the peer protocol needs: a handshake, the peer's certificate, send,
receive, close. All calls happen on the trio thread; each SSLObject call is
synchronous, so sends and receives of different tasks never interleave inside
OpenSSL. Records OpenSSL wants to send while reading (TLS 1.3 key updates) are
flushed by the next send or receive.
"""

from __future__ import annotations

import contextlib
import ssl

import trio

RECEIVE_SIZE = 1024 * 1024


class TLSStream(trio.abc.Stream):
    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool):
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._send_lock = trio.Lock()
        self._receiving = False
        self._eof = False

    # -- handshake ------------------------------------------------------------

    async def do_handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError as e:
                # Send our alert (e.g. "bad certificate") before giving up.
                await self._flush_quietly()
                raise trio.BrokenResourceError(f"TLS handshake failed: {e}") from None
            await self._flush()
            return

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    @property
    def version(self) -> str | None:
        return self._obj.version()

    # -- data -----------------------------------------------------------------

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._obj.write(data)
        except ssl.SSLError as e:
            raise trio.BrokenResourceError(f"TLS send failed: {e}") from None
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this TLS stream")
        self._receiving = True
        try:
            while True:
                parts: list[bytes] = []
                try:
                    while True:
                        part = self._obj.read(RECEIVE_SIZE)
                        if not part:
                            break
                        parts.append(part)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    self._eof = True
                except ssl.SSLError as e:
                    raise trio.BrokenResourceError(f"TLS receive failed: {e}") from None
                if self._outgoing.pending:
                    await self._flush()
                if parts:
                    return b"".join(parts)
                if self._eof:
                    return b""
                await self._fill()
        finally:
            self._receiving = False

    async def _fill(self) -> None:
        data = await self.transport.receive_some(RECEIVE_SIZE)
        if not data:
            if self._eof:
                return
            self._incoming.write_eof()
            self._eof = True
            return
        self._incoming.write(data)

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await self.transport.send_all(data)

    async def _flush_quietly(self) -> None:
        try:
            with trio.move_on_after(1):
                await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def aclose(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            self._obj.unwrap()
        try:
            await self._flush_quietly()
        finally:
            await self.transport.aclose()  # closes the socket even when cancelled
