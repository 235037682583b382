"""RPC: calls between services across the mesh (service.py), their streams (streams.py)
and the control ops (ops.py)."""
