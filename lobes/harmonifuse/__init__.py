"""HarmoniFuse modules: speech LM, gated encoder fusion, dynamic LM fusion, task interleaving."""
