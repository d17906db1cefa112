"""Locust load tests for the kloop model server (OIP v2 over HTTP and gRPC).

Entry point: ``locust -f loadtests/locustfile.py``; see ``loadtests/README.md``.
"""
