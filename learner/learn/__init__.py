"""``tiller learn``: the continuous learner (trigger, train, gate, publish, promote)."""
