"""Split a protected checkpoint into a bundle: public network, sealed secrets, signed manifest."""
