//! Conveyor in one process: the embedded mode behind `conveyor dev`.

pub mod dev;
