"""The feedback loop: clinicians' corrections of the node's results, matched to their jobs and measured, and drift.

==================== =======================================================================================
``agreement``        per-segment Dice, volume difference (mL, %) and HD95 (MONAI's metrics)
``corrections``      matching a corrected SEG to the job whose SEG it corrects (the node's feedback thread)
``performance``      local performance per pipeline: reviews, agreement per segment, uncertainty ranking
``reissue``          a reviewed report re-issued on the FHIR destinations with the reviewer
``drift``            each pipeline's inputs and outputs against its baseline: PSI, one alert per episode
==================== =======================================================================================
"""
