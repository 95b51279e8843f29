"""One module per model family; ``registry.ARCHITECTURES`` says which defines each architecture."""
