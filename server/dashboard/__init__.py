"""The fedlora dashboard: a read-only web app over the coordinator's run store (``fedlora dashboard``)."""

from server.dashboard.app import create_app

__all__ = ["create_app"]
