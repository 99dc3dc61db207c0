"""The live system: WebSocket audio ingest, senders, and (next) the media-clocked GPU pipeline."""
