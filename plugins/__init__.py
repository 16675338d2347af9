"""The built-in regularizers: l2, decoupled_decay, dropout and grad_clip (installed as l2cluster.plugins)."""
