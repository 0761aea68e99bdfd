"""fedlora coordinator: the Flower ServerApp, its strategy, run outputs and the dashboard."""
