"""ablate: designed ablation studies of attention geometries, with honest attribution."""
