"""Grouped matrix multiply over rows sorted by group (a mixture of experts' tokens sorted by
expert): group ``g``'s consecutive rows of ``lhs`` times ``rhs[g]``, ragged group sizes."""
