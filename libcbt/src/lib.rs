pub mod extent;
