"""AdaLTM modules: task vectors, checkpoint import, layer groups, λ, merged WavLM, folded export, feature cache."""
