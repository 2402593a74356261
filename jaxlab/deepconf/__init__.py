"""DeepConf (Fu et al. 2025): answers, votes and the online threshold over sampled traces."""
