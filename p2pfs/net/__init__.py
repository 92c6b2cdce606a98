"""The peer network: frames, messages, connections, discovery, digests, fetching."""
