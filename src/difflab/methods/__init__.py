"""What a run trains and how it draws: the method classes (``method``: one per kind, each answering for its
denoiser, sampling defaults and samplers), the noise levels they train at (``noise_levels``), the loss
weightings (``weighting``) and the classifier methods (``classification``). Below the run layer."""
