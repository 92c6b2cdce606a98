"""The volumes a node holds: their names, ids, chunking parameters and head snapshots.

Each volume lives in ``HOME/volumes/NAME/``: ``volume.json`` (name, id, params,
head snapshot id and sequence) and, on the publisher, ``publisher.key``. The
head snapshot itself is an object in the store; it is verified (signature,
volume id, sequence) every time it is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from p2pfs.chunking.params import ChunkParams
from p2pfs.errors import (
    DecodeError,
    IntegrityError,
    NotFound,
    P2pfsError,
    SignatureError,
)
from p2pfs.fsutil import write_atomic
from p2pfs.home import Home
from p2pfs.ids import VolumeId
from p2pfs.keys import SigningKey
from p2pfs.names import check_volume_name
from p2pfs.objects.model import Snapshot, decode_snapshot
from p2pfs.store.cas import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeRecord:
    name: str
    id: VolumeId
    params: ChunkParams
    head: bytes | None  # id of the newest accepted snapshot
    seq: int  # its sequence number (0: no snapshot yet)
    # The estate CA's signature saying this volume key belongs to the estate
    # (None for a volume made outside an estate: peers will not follow it).
    endorsement: bytes | None = None
    origin: bytes | None = None  # node id of the publisher; None when this node is it
    # The publisher records every entry's uid and gid in its snapshots (--keep-owners).
    # Followers need not know: they see owners in the entries that carry them.
    keep_owners: bool = False

    def to_json(self) -> bytes:
        doc = {
            "name": self.name,
            "id": self.id.hex(),
            "params": self.params.to_dict(),
            "head": self.head.hex() if self.head else None,
            "seq": self.seq,
            "endorsement": self.endorsement.hex() if self.endorsement else None,
            "origin": self.origin.hex() if self.origin else None,
        } | ({"keep_owners": True} if self.keep_owners else {})
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> VolumeRecord:
        try:
            doc = json.loads(data)
            head = doc["head"]
            endorsement = doc.get("endorsement")
            origin = doc.get("origin")
            keep_owners = doc.get("keep_owners", False)
            if not isinstance(keep_owners, bool):
                raise ValueError(f"keep_owners must be true or false, not {keep_owners!r}")
            return cls(
                name=str(doc["name"]),
                id=VolumeId(bytes.fromhex(doc["id"])),
                params=ChunkParams.from_dict(doc["params"]),
                head=bytes.fromhex(head) if head else None,
                seq=int(doc["seq"]),
                endorsement=bytes.fromhex(endorsement) if endorsement else None,
                origin=bytes.fromhex(origin) if origin else None,
                keep_owners=keep_owners,
            )
        except (ValueError, KeyError, TypeError, DecodeError) as e:
            raise P2pfsError(f"{where} is damaged ({e})") from None


class VolumeRegistry:
    def __init__(self, home: Home) -> None:
        self.home = home

    def _dir(self, name: str) -> Path:
        check_volume_name(name)
        return self.home.volumes_dir / name

    def names(self) -> list[str]:
        if not self.home.volumes_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.home.volumes_dir.iterdir() if (p / "volume.json").is_file()
        )

    def create(
        self,
        name: str,
        params: ChunkParams | None = None,
        endorse: Callable[[bytes, str], bytes] | None = None,
        *,
        keep_owners: bool = False,
    ) -> VolumeRecord:
        params = params or ChunkParams()
        params.validate()
        d = self._dir(name)
        if (d / "volume.json").exists():
            raise P2pfsError(f"volume {name!r} already exists")
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path = d / "publisher.key"
        if not key_path.exists():
            SigningKey.generate().save(key_path)
        key = SigningKey.load(key_path)
        vid = VolumeId(key.public_bytes())
        endorsement = endorse(vid, name) if endorse is not None else None
        record = VolumeRecord(name, vid, params, None, 0, endorsement, keep_owners=keep_owners)
        write_atomic(d / "volume.json", record.to_json())
        log.info("created volume %s id %s", name, record.id.hex())
        return record

    def get(self, name: str) -> VolumeRecord:
        path = self._dir(name) / "volume.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise NotFound(f"unknown volume {name!r} (volumes here: {known})") from None
        record = VolumeRecord.from_json(data, path)
        if record.name != name:
            raise P2pfsError(f"{path} names volume {record.name!r}, expected {name!r}")
        return record

    def publisher_key(self, name: str) -> SigningKey:
        path = self._dir(name) / "publisher.key"
        if not path.exists():
            raise NotFound(f"this node does not hold the publisher key of volume {name!r}")
        key = SigningKey.load(path)
        if key.public_bytes() != self.get(name).id:
            raise IntegrityError(f"{path} does not match the id of volume {name!r}")
        return key

    def advance(self, record: VolumeRecord, snapshot: Snapshot, snapshot_id: bytes) -> VolumeRecord:
        """Make ``snapshot`` the head: only a verified, newer snapshot of this volume."""
        current = self.get(record.name)
        snapshot.verify()
        if snapshot.volume_id != current.id:
            raise IntegrityError(f"snapshot belongs to another volume than {record.name!r}")
        if snapshot.seq <= current.seq:
            raise IntegrityError(
                f"snapshot {snapshot.seq} of {record.name!r} is not newer than {current.seq}"
            )
        new = replace(current, head=snapshot_id, seq=snapshot.seq)
        write_atomic(self._dir(record.name) / "volume.json", new.to_json())
        return new

    def restore(self, record: VolumeRecord, key: SigningKey) -> VolumeRecord:
        """Install a volume this node publishes from now on (an estate backup's): its
        publisher key and its record, whose head snapshot the caller stored already.

        A volume already here under that name must be the same one (same key); if its
        sequence is ahead of ``record``'s it is kept: a sequence never goes back.
        """
        if key.public_bytes() != record.id or record.origin is not None:
            raise IntegrityError(f"the publisher key of volume {record.name!r} is not its id")
        d = self._dir(record.name)
        key_path = d / "publisher.key"
        current = None
        if (d / "volume.json").exists():
            current = self.get(record.name)
            if current.id != record.id:
                raise P2pfsError(
                    f"this node holds another volume named {record.name!r} "
                    f"({current.id.hex()[:16]}); not replacing it"
                )
        if key_path.exists() and SigningKey.load(key_path).public_bytes() != record.id:
            raise IntegrityError(f"{key_path} does not match the id of volume {record.name!r}")
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not key_path.exists():
            key.save(key_path)
        if current is not None and current.seq >= record.seq:
            record = replace(
                current, origin=None, endorsement=current.endorsement or record.endorsement
            )
        write_atomic(d / "volume.json", record.to_json())
        log.info("restored volume %s id %s at seq %d", record.name, record.id.hex(), record.seq)
        return record

    def set_endorsement(self, name: str, endorsement: bytes) -> VolumeRecord:
        record = replace(self.get(name), endorsement=endorsement)
        write_atomic(self._dir(name) / "volume.json", record.to_json())
        return record

    def is_publisher(self, name: str) -> bool:
        return (self._dir(name) / "publisher.key").exists()

    def follow(
        self,
        snapshot: Snapshot,
        snapshot_id: bytes,
        endorsement: bytes,
        origin: bytes | None,
    ) -> VolumeRecord:
        """Accept a verified, endorsed snapshot from a peer as this volume's new head.

        The caller has checked the endorsement; here the signature is checked again,
        the volume must be the one known under this name, and the sequence number
        must rise: a replayed older snapshot is refused (SignatureError).
        """
        snapshot.verify()
        name = snapshot.name
        d = self._dir(name)
        path = d / "volume.json"
        if path.exists():
            current = self.get(name)
            if current.id != snapshot.volume_id:
                raise SignatureError(
                    f"volume {name!r} here has another key than the snapshot offered"
                )
            if snapshot.seq <= current.seq:
                raise SignatureError(
                    f"snapshot {snapshot.seq} of {name!r} is not newer than {current.seq}"
                )
            record = replace(
                current,
                head=snapshot_id,
                seq=snapshot.seq,
                endorsement=endorsement,
                origin=origin or current.origin,
            )
        else:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            record = VolumeRecord(
                name,
                VolumeId(snapshot.volume_id),
                ChunkParams.from_dict(snapshot.params),
                snapshot_id,
                snapshot.seq,
                endorsement,
                origin,
            )
        write_atomic(path, record.to_json())
        return record

    def load_head(self, store: Store, record: VolumeRecord) -> Snapshot | None:
        """The verified head snapshot of a volume, or None before its first import."""
        if record.head is None:
            return None
        snapshot = decode_snapshot(store.get_object(record.head))
        if snapshot.volume_id != record.id or snapshot.seq != record.seq:
            raise IntegrityError(
                f"head snapshot of {record.name!r} does not match its record "
                f"(seq {snapshot.seq}, expected {record.seq})"
            )
        return snapshot
