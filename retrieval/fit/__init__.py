"""``retrieval fit``: label-free post-processing (whitening, PCA heads, adapter-2 re-fit) fitted on a
gallery sample and folded into the model (:mod:`retrieval.fit.job`)."""
