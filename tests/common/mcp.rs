//! Calling cwm's MCP tools from the tests, with rmcp's client.

use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::service::RunningService;
use rmcp::RoleClient;
use serde_json::Value;

pub type Mcp = RunningService<RoleClient, ClientConfig>;

/// Call a tool: its structured result, or the error text of a failed call.
pub fn call(
    rt: &tokio::runtime::Runtime,
    client: &RunningService<RoleClient, impl rmcp::ClientHandler>,
    tool: &str,
    args: Value,
) -> Result<Value, String> {
    let args = args.as_object().cloned().unwrap_or_default();
    let r = rt
        .block_on(
            client.call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args)),
        )
        .expect("the tool call gets an answer");
    let text: String = r
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect();
    if r.is_error == Some(true) {
        Err(text)
    } else {
        Ok(r.structured_content.unwrap_or(Value::Null))
    }
}
