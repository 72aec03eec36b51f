"""Scaling laws over (N, D) (`laws`), loss-curve laws under LR schedules (`curves`), their inputs
(`inputs`), plots (`plots`) and the `cptrain scaling` commands (`cli`)."""
