"""kloop's built-in example tasks (registered as ``kloop.tasks`` entry points, so ``kloop
tasks`` lists them and ``kloop train --task NAME`` finds them): each is a task a user could have
written (``trainer.task``), on data a package ships, so nothing downloads.

    digits         the 8x8 digits CNN (10 classes, accuracy)
    breast-cancer  a tabular classifier (2 classes, 30 features, standardized in the graph)
    diabetes       a regression (RMSE, lower is better) with two named inputs
"""
