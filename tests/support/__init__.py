"""Real servers shared by the test folders (see scripted_server.py)."""
