"""Generated protobuf code for pointmesh.v1; regenerate with `make protos`."""
