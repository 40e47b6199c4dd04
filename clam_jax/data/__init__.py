"""Random-access data sources (ek100, thumos14, ego4d), the synthetic EK100 generator and the grain
input pipeline (pipeline.make_loader)."""
