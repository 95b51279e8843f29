"""A decode step's attention in one op: rope on the new token's q and k, its K/V written into the
paged cache, one query token per sequence attending over the cache and itself."""
