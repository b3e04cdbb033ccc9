"""Layer classes that know their tensor-parallel slice (TP=1 today)."""
