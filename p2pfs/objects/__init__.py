"""The object model: canonical msgpack, blobs, trees and signed snapshots."""
