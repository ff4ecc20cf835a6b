"""Tools beside the library: the AR benchmark (:mod:`.bench`) and random-weight models and checkpoints
(:mod:`.synthetic`).  Nothing in the library imports them."""
