"""crosstvr stage two: the first stage (projections, temporal pooling, contrastive loss) and the
decoupled spatial/temporal cross-attention reranker, trained on cached frozen-CLIP tensors."""
