"""scikit-learn estimators over one layer and one trainer."""
# -- each estimator's owner adds its import line below --
