"""The side-by-side benchmark: kloop against the peer servers of ``../shared/bench/peers``."""
