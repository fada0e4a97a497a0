"""Python modules generated from `protos/` by the build (`setup.py` runs grpcio-tools'
protoc here on `pip install`): `ca_pb2` (messages) and `ca_pb2_grpc` (stubs). They are
not committed and never edited by hand; rerun `pip install -e .` after changing a .proto."""
