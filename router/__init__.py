"""router/: the learned sequence-level router that picks one heterogeneous expert per request."""
