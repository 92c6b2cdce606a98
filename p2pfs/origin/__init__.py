"""Origins: where a volume's objects always exist, beyond any one machine.

One layout for every kind (``layout``): object storage through the S3 API (``s3``), any
static HTTP server (``http``), a directory that a web server publishes
(``directory``). The publisher uploads to them (``sync``) and announces them in its
signed snapshots (``announce``); readers fetch from them after the LAN's peers
(``source``) and learn new snapshots from their ``latest`` pointer (``watch``). An
origin is untrusted storage: every byte read from one is verified (docs/origins.md).
"""
