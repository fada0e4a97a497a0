"""Python modules generated from `protos/meshline/nodeagent/v1` by the build (`setup.py`
runs grpcio-tools' protoc here on `pip install`): `nodeagent_pb2` (messages) and
`nodeagent_pb2_grpc` (stubs). They are not committed and never edited by hand; rerun
`pip install -e .` after changing the .proto."""
