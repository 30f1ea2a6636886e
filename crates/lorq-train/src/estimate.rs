//! `lorq estimate`: training memory from the real config shapes.
