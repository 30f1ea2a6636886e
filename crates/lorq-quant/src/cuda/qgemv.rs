/// placeholder, replaced below
#[derive(Debug)]
pub struct GpuQuantWeight;
