"""Central stage: a causal LM conditioned on the federated sensor encoders (IoT-LM)."""
