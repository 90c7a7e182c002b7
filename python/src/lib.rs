//! `surfing_weights._native`: the engine, the weight server and their errors
//! as a Python extension module. The package `surfing_weights` re-exports it
//! and adds what is plainer in Python (`encode_async`).

mod error;
mod model;
mod server;

use pyo3::prelude::*;

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add_class::<server::WeightServer>()?;
    module.add_class::<model::StreamingModel>()?;
    module.add(
        "WeightServerError",
        py.get_type::<error::WeightServerError>(),
    )?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
