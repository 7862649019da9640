"""Examples that use qdserve but are not part of it (not packaged): the demo-model trainer."""
