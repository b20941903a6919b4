"""``fedpersona deploy``: a real SuperLink and SuperNodes over gRPC with TLS and node
authentication, and the certificates they use."""
