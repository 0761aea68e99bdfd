"""fedlora: pure math and types shared by the coordinator and the clients (no Flower, no I/O)."""
