"""fedlora client: the Flower ClientApp, model loading, local training and evaluation."""
