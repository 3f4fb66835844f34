"""Where models come from: the catalogue, source resolvers, weight streaming and the demo zoo."""
