"""``tiller align``: continuous online alignment — server, annotator and learner, supervised."""
