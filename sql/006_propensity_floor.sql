-- Per-experiment propensity floor f (ExplorationConfig.propensity_floor): under Thompson
-- sampling every variant is picked with probability at least f, so that the logged assignments
-- support off-policy evaluation. 0 means off (plain Thompson sampling), as for every experiment
-- stored before this column existed. The domain layer also checks f < 1 / (number of variants).

ALTER TABLE experiments
    ADD COLUMN propensity_floor double precision NOT NULL DEFAULT 0
        CHECK (propensity_floor >= 0 AND propensity_floor < 1);
