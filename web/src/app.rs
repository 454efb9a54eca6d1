//! The Yew components. They hold no state of their own beyond form inputs: the feed
//! and the forms dispatch [`Action`]s to one reducer, and every view renders
//! [`Console`].

use crate::model::{Action, Answer, ClusterView, Console, Link, LockRow, NodeCard};
use futures_util::StreamExt;
use gloo_net::eventsource::futures::EventSource;
use gloo_net::eventsource::State as FeedState;
use std::rc::Rc;
use yew::prelude::*;

/// Render the console into `<div id="console">` (or the body).
pub(crate) fn start() {
    let root = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.get_element_by_id("console"));
    match root {
        Some(root) => yew::Renderer::<App>::with_root(root).render(),
        None => yew::Renderer::<App>::new().render(),
    };
}

impl Reducible for Console {
    type Action = Action;
    fn reduce(self: Rc<Self>, action: Action) -> Rc<Self> {
        let mut next = (*self).clone();
        next.reduce(action);
        Rc::new(next)
    }
}

type Dispatch = UseReducerDispatcher<Console>;

/// Follow `/api/events` for the page's life. The browser's EventSource reconnects by
/// itself after a dropped connection; one it gave up on (closed) is made again.
fn follow(dispatch: Dispatch) {
    yew::platform::spawn_local(async move {
        loop {
            if let Ok(mut feed) = EventSource::new("/api/events") {
                if let Ok(mut states) = feed.subscribe("state") {
                    while let Some(event) = states.next().await {
                        match event {
                            Ok((_, message)) => {
                                let text = message.data().as_string().unwrap_or_default();
                                if let Ok(view) = serde_json::from_str::<ClusterView>(&text) {
                                    dispatch.dispatch(Action::Snapshot(view));
                                }
                            }
                            Err(_) => {
                                dispatch.dispatch(Action::LinkLost);
                                if feed.state() == FeedState::Closed {
                                    break;
                                }
                            }
                        }
                    }
                }
                feed.close();
            }
            dispatch.dispatch(Action::LinkLost);
            gloo_timers::future::TimeoutFuture::new(1_000).await;
        }
    });
}

/// POST a JSON body and record the answer, whatever it is.
fn call(dispatch: Dispatch, path: String, body: serde_json::Value) {
    yew::platform::spawn_local(async move {
        let asked = format!("POST {path} {body}");
        let answer = match gloo_net::http::Request::post(&path).json(&body) {
            Ok(request) => match request.send().await {
                Ok(response) => Answer {
                    asked,
                    status: response.status(),
                    body: response.text().await.unwrap_or_default(),
                },
                Err(e) => Answer {
                    asked,
                    status: 0,
                    body: e.to_string(),
                },
            },
            Err(e) => Answer {
                asked,
                status: 0,
                body: e.to_string(),
            },
        };
        dispatch.dispatch(Action::Answered(answer));
    });
}

#[function_component(App)]
fn app() -> Html {
    let console = use_reducer(Console::default);
    {
        let dispatch = console.dispatcher();
        use_effect_with((), move |_| follow(dispatch));
    }
    let (link_class, link_text) = match console.link {
        Link::Connecting => ("link", "connecting…"),
        Link::Live => ("link live", "live"),
        Link::Reconnecting => ("link reconnecting", "reconnecting…"),
    };
    let leader = console.leader().map_or_else(
        || "no leader".to_owned(),
        |n| format!("leader {} · term {}", n.id, n.term),
    );
    let problems = console
        .view
        .as_ref()
        .map(|v| v.problems.clone())
        .unwrap_or_default();
    // The forms re-render only when the node list changes: a re-render sets every
    // field back to its default, under the fingers of whoever is typing.
    let node_ids: Vec<String> = console
        .view
        .as_ref()
        .map(|v| v.nodes.iter().map(|n| n.id.clone()).collect())
        .unwrap_or_default();
    html! {
        <>
        <header>
            <h1>{ "syncmesh" }</h1>
            <span id="leader">{ leader }</span>
            <span id="link" class={link_class} role="status" aria-live="polite">{ link_text }</span>
        </header>
        if !problems.is_empty() {
            <p class="problems" role="alert">{ problems.join("; ") }</p>
        }
        <main>
            <Nodes console={console.clone()} />
            <Timeline console={console.clone()} />
            <Locks console={console.clone()} />
            <Queues console={console.clone()} />
            <Cache console={console.clone()} />
            <Metrics console={console.clone()} />
            <Actions nodes={node_ids} dispatch={console.dispatcher()} />
            <Answers console={console.clone()} />
        </main>
        </>
    }
}

#[derive(Properties, PartialEq)]
struct ViewProps {
    console: UseReducerHandle<Console>,
}

fn node_card(n: &NodeCard, now_ms: u64, faults: bool, dispatch: &Dispatch) -> Html {
    let class = classes!(
        "node",
        (n.up && n.role == "leader").then_some("leader"),
        (!n.up).then_some("down")
    );
    let fault = |what: &'static str| {
        let (dispatch, id) = (dispatch.clone(), n.id.clone());
        Callback::from(move |_| {
            call(
                dispatch.clone(),
                format!("/api/fault/{what}"),
                serde_json::json!({ "node": id }),
            )
        })
    };
    html! {
        <article class={class} id={format!("node-{}", n.id)} data-role={n.role.clone()} data-term={n.term.to_string()}>
            <h3>{ &n.id }</h3>
            if n.up {
                <div class="role">{ &n.role }</div>
                <div>{ format!("term {}", n.term) }</div>
                <div>{ format!("leader {}", n.leader.as_deref().unwrap_or("?")) }</div>
                <div>{ format!("commit {} · applied {}", n.commit, n.applied) }</div>
            } else {
                <div class="bad">{ "not answering" }</div>
                if n.last_seen_ms > 0 {
                    <div>{ format!("last heard {:.0} s ago", now_ms.saturating_sub(n.last_seen_ms) as f64 / 1000.0) }</div>
                } else {
                    <div>{ "never heard from" }</div>
                }
            }
            if faults {
                <div>
                    if n.up {
                        <button id={format!("stop-{}", n.id)} aria-label={format!("stop {}", n.id)} onclick={fault("stop")}>{ "stop" }</button>
                        <button id={format!("isolate-{}", n.id)} aria-label={format!("isolate {}", n.id)} onclick={fault("isolate")}>{ "isolate" }</button>
                        <button id={format!("heal-{}", n.id)} aria-label={format!("heal {}", n.id)} onclick={fault("heal")}>{ "heal" }</button>
                    } else {
                        <button id={format!("restart-{}", n.id)} aria-label={format!("restart {}", n.id)} onclick={fault("restart")}>{ "restart" }</button>
                    }
                </div>
            }
        </article>
    }
}

#[function_component(Nodes)]
fn nodes(p: &ViewProps) -> Html {
    let Some(view) = &p.console.view else {
        return html! { <section class="wide" aria-labelledby="h-nodes"><h2 id="h-nodes">{ "Nodes" }</h2><p>{ "waiting for the cluster…" }</p></section> };
    };
    let dispatch = p.console.dispatcher();
    html! {
        <section class="wide" aria-labelledby="h-nodes">
            <h2 id="h-nodes">{ "Nodes" }</h2>
            <div class="nodes">{ for view.nodes.iter().map(|n| node_card(n, view.at_ms, view.faults, &dispatch)) }</div>
        </section>
    }
}

#[function_component(Timeline)]
fn timeline(p: &ViewProps) -> Html {
    html! {
        <section aria-labelledby="h-timeline">
            <h2 id="h-timeline">{ "Timeline" }</h2>
            <ol class="timeline" id="timeline">
                { for p.console.timeline.iter().map(|e| html! {
                    <li class={classes!(e.leadership.then_some("leadership"))}>{ &e.what }</li>
                }) }
            </ol>
        </section>
    }
}

#[function_component(Locks)]
fn locks(p: &ViewProps) -> Html {
    let (locks, deadlocks, recent) = p
        .console
        .view
        .as_ref()
        .and_then(|v| v.locks.clone())
        .map(|l| (l.keys, l.deadlocks, l.recent_deadlocks))
        .unwrap_or_default();
    // The clients of the newest refusal's cycle, if it is recent: their rows are marked.
    let in_cycle: Vec<String> = recent
        .last()
        .filter(|d| d.ago_ms < 30_000)
        .map(|d| d.cycle.clone())
        .unwrap_or_default();
    let marked = |l: &LockRow| {
        l.holders.iter().any(|h| in_cycle.contains(&h.client_id))
            || l.waiters.iter().any(|w| in_cycle.contains(&w.client_id))
    };
    html! {
        <section aria-labelledby="h-locks">
            <h2 id="h-locks">{ "Locks" }</h2>
            <p class={classes!((deadlocks > 0).then_some("bad"))}>{ format!("deadlock refusals: {deadlocks}") }</p>
            if !recent.is_empty() {
                <ul class="deadlocks bad" id="deadlocks" aria-label="recent deadlock refusals">
                { for recent.iter().rev().map(|d| html! {
                    <li data-key={d.key.clone()}>{ format!("{} asked {}: {} ({:.0} s ago)", d.cycle.first().map_or("?", String::as_str), d.key, d.cycle_text(), d.ago_ms as f64 / 1000.0) }</li>
                }) }
                </ul>
            }
            <table id="locks">
                <thead><tr><th scope="col">{ "key" }</th><th scope="col">{ "mode" }</th><th scope="col">{ "holders" }</th><th scope="col">{ "waiters" }</th></tr></thead>
                <tbody>
                { for locks.iter().map(|l| html! {
                    <tr data-key={l.key.clone()} class={classes!(marked(l).then_some("cycle"))}>
                        <td>{ &l.key }</td>
                        <td>{ l.mode.as_deref().unwrap_or("–") }</td>
                        <td class="holders">{ l.holders.iter().map(|h| format!("{} {} #{} {:.1}s", h.client_id, h.mode, h.token, h.lease_left_ms as f64 / 1000.0)).collect::<Vec<_>>().join(", ") }</td>
                        <td>{ l.waiters.iter().map(|w| format!("{} {}", w.client_id, w.mode)).collect::<Vec<_>>().join(" → ") }</td>
                    </tr>
                }) }
                </tbody>
            </table>
        </section>
    }
}

#[function_component(Queues)]
fn queues(p: &ViewProps) -> Html {
    let queues = p
        .console
        .view
        .as_ref()
        .and_then(|v| v.queues.clone())
        .unwrap_or_default();
    html! {
        <section aria-labelledby="h-queues">
            <h2 id="h-queues">{ "Queues" }</h2>
            <table id="queues">
                <thead><tr><th scope="col">{ "partition" }</th><th scope="col">{ "ring" }</th><th scope="col">{ "depth" }</th><th scope="col">{ "in flight" }</th><th scope="col">{ "dead" }</th></tr></thead>
                <tbody>
                { for queues.iter().map(|q| html! {
                    <>
                    <tr data-queue={q.queue.clone()}><th scope="row">{ &q.queue }</th><td></td><td>{ q.depth }</td><td>{ q.inflight }</td><td class={classes!((q.dead_letters > 0).then_some("bad"))}>{ q.dead_letters }</td></tr>
                    { for q.partitions.iter().map(|part| html! {
                        <tr data-partition={format!("{}/{}", q.queue, part.partition)} class="partition">
                            <td>{ format!("  p{}", part.partition) }</td>
                            <td>{ format!("{:.0}%", part.ring_share * 100.0) }</td>
                            <td class="depth">{ part.depth }</td>
                            <td>{ part.inflight }</td>
                            <td></td>
                        </tr>
                    }) }
                    </>
                }) }
                </tbody>
            </table>
        </section>
    }
}

#[function_component(Cache)]
fn cache(p: &ViewProps) -> Html {
    let Some(view) = &p.console.view else {
        return html! { <section aria-labelledby="h-cache"><h2 id="h-cache">{ "Cache" }</h2></section> };
    };
    let matrix = p.console.cache_matrix();
    let flashes = &p.console.flashes;
    html! {
        <section aria-labelledby="h-cache">
            <h2 id="h-cache">{ "Cache (MESI)" }</h2>
            <table id="cache-stats">
                <thead><tr><th scope="col">{ "node" }</th><th scope="col">{ "hits" }</th><th scope="col">{ "misses" }</th><th scope="col">{ "invalidations" }</th><th scope="col">{ "write-backs" }</th></tr></thead>
                <tbody>
                { for view.cache.iter().map(|c| html! {
                    <tr class={classes!((!c.up).then_some("down"))}><th scope="row">{ &c.node }{ if c.up { "" } else { " (not answering)" } }</th><td>{ c.hits }</td><td>{ c.misses }</td><td>{ c.invalidations }</td><td>{ c.writebacks }</td></tr>
                }) }
                </tbody>
            </table>
            <table id="cache-matrix">
                <caption>{ "lines: key × node" }</caption>
                <thead><tr><th scope="col">{ "key" }</th>{ for view.cache.iter().map(|c| html! { <th scope="col">{ &c.node }</th> }) }</tr></thead>
                <tbody>
                { for matrix.iter().map(|(key, states)| html! {
                    <tr>
                        <th scope="row">{ key }</th>
                        { for states.iter().zip(&view.cache).map(|(state, node)| {
                            let flash = flashes.iter().any(|(k, n)| k == key && *n == node.node);
                            html! {
                                <td class={classes!("cell", state.clone(), flash.then_some("flash"))}
                                    data-key={key.clone()} data-node={node.node.clone()} data-state={state.clone()}>{ state }</td>
                            }
                        }) }
                    </tr>
                }) }
                </tbody>
            </table>
        </section>
    }
}

fn sparkline(points: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64) -> Html {
    let max = points.iter().map(pick).fold(1e-9, f64::max);
    let n = points.len().max(2) as f64 - 1.0;
    let line: String = points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{:.1},{:.1} ",
                i as f64 * 100.0 / n,
                30.0 - pick(p) / max * 28.0
            )
        })
        .collect();
    html! {
        <svg class="spark" viewBox="0 0 100 30" preserveAspectRatio="none" role="img" aria-label="sparkline">
            <polyline points={line} fill="none" stroke="#0b6bcb" stroke-width="1" vector-effect="non-scaling-stroke" />
        </svg>
    }
}

#[function_component(Metrics)]
fn metrics(p: &ViewProps) -> Html {
    html! {
        <section aria-labelledby="h-metrics">
            <h2 id="h-metrics">{ "Traffic through this gateway" }</h2>
            <table>
                <thead><tr><th scope="col">{ "service" }</th><th scope="col">{ "ops/s" }</th><th scope="col">{ "p99 ms" }</th></tr></thead>
                <tbody>
                { for p.console.series.iter().map(|(service, points)| {
                    let points: Vec<(f64, f64)> = points.iter().copied().collect();
                    let last = points.last().copied().unwrap_or_default();
                    html! {
                        <tr>
                            <th scope="row">{ service }</th>
                            <td>{ format!("{:.0}", last.0) }{ sparkline(&points, |p| p.0) }</td>
                            <td>{ format!("{:.1}", last.1) }{ sparkline(&points, |p| p.1) }</td>
                        </tr>
                    }
                }) }
                </tbody>
            </table>
        </section>
    }
}

/// The value of a form field by id.
fn field(id: &str) -> String {
    use wasm_bindgen::JsCast;
    let Some(element) = web_sys::window()
        .and_then(|w| w.document())
        .and_then(|d| d.get_element_by_id(id))
    else {
        return String::new();
    };
    if let Some(input) = element.dyn_ref::<web_sys::HtmlInputElement>() {
        return input.value();
    }
    element
        .dyn_ref::<web_sys::HtmlSelectElement>()
        .map(|s| s.value())
        .unwrap_or_default()
}

/// A JSON value typed in a field: JSON if it parses, else the text as a string.
fn json_field(id: &str) -> serde_json::Value {
    let text = field(id);
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

#[derive(Properties, PartialEq)]
struct ActionsProps {
    nodes: Vec<String>,
    dispatch: Dispatch,
}

#[function_component(Actions)]
fn actions(p: &ActionsProps) -> Html {
    let dispatch = p.dispatch.clone();
    let nodes = &p.nodes;
    let submit = |make: fn() -> (&'static str, serde_json::Value)| {
        let dispatch = dispatch.clone();
        Callback::from(move |e: SubmitEvent| {
            e.prevent_default();
            let (path, body) = make();
            call(dispatch.clone(), path.to_owned(), body);
        })
    };
    let button =
        |make: fn() -> (&'static str, serde_json::Value), label: &'static str, id: &'static str| {
            let dispatch = dispatch.clone();
            let onclick = Callback::from(move |_| {
                let (path, body) = make();
                call(dispatch.clone(), path.to_owned(), body);
            });
            html! { <button type="button" id={id} onclick={onclick}>{ label }</button> }
        };
    let node_select = |id: &'static str| {
        html! {
            <label>{ "node" }<select id={id}>{ for nodes.iter().map(|n| html! { <option value={n.clone()}>{ n }</option> }) }</select></label>
        }
    };
    html! {
        <section class="wide" aria-labelledby="h-actions">
            <h2 id="h-actions">{ "Actions" }</h2>
            <form id="lock-form" aria-label="lock" onsubmit={submit(|| ("/lock/acquire", serde_json::json!({
                "key": field("lock-key"), "mode": field("lock-mode"), "client_id": field("lock-client"),
                "wait_ms": field("lock-wait").parse::<u64>().unwrap_or(0) })))}>
                <label>{ "key" }<input id="lock-key" value="A" required=true /></label>
                <label>{ "mode" }<select id="lock-mode"><option value="X" selected=true>{ "X" }</option><option value="S">{ "S" }</option></select></label>
                <label>{ "client id" }<input id="lock-client" value="console" required=true /></label>
                <label>{ "wait ms" }<input id="lock-wait" type="number" min="0" value="0" /></label>
                <button type="submit" id="lock-acquire">{ "acquire" }</button>
                { button(|| ("/lock/release", serde_json::json!({ "key": field("lock-key"), "client_id": field("lock-client") })), "release", "lock-release") }
            </form>
            <form id="queue-form" aria-label="queue" onsubmit={submit(|| ("/queue/enq", serde_json::json!({
                "queue": field("queue-name"), "key": field("queue-key"), "value": json_field("queue-value") })))}>
                <label>{ "queue" }<input id="queue-name" value="default" required=true /></label>
                <label>{ "key" }<input id="queue-key" value="user:42" required=true /></label>
                <label>{ "value" }<input id="queue-value" value="hello" /></label>
                <button type="submit" id="queue-enq">{ "enqueue" }</button>
                { button(|| ("/queue/deq", serde_json::json!({ "queue": field("queue-name") })), "dequeue", "queue-deq") }
                <label>{ "msg id" }<input id="queue-msg" /></label>
                { button(|| ("/queue/ack", serde_json::json!({ "msg_id": field("queue-msg") })), "ack", "queue-ack") }
            </form>
            <form id="cache-form" aria-label="cache" onsubmit={submit(|| ("/cache/put", serde_json::json!({
                "key": field("cache-key"), "val": json_field("cache-val"), "node": field("cache-node") })))}>
                <label>{ "key" }<input id="cache-key" value="user:42" required=true /></label>
                <label>{ "value (JSON)" }<input id="cache-val" value="{\"name\":\"Arya\"}" /></label>
                { node_select("cache-node") }
                <button type="submit" id="cache-put">{ "put" }</button>
                { button(|| ("/cache/get", serde_json::json!({ "key": field("cache-key"), "node": field("cache-node") })), "get", "cache-get") }
                { button(|| ("/cache/evict", serde_json::json!({ "key": field("cache-key"), "node": field("cache-node") })), "evict", "cache-evict") }
            </form>
        </section>
    }
}

#[function_component(Answers)]
fn answers(p: &ViewProps) -> Html {
    html! {
        <section class="wide" aria-labelledby="h-answers">
            <h2 id="h-answers">{ "Answers" }</h2>
            <ol class="answers" id="answers" aria-live="polite">
                { for p.console.answers.iter().map(|a| html! {
                    <li class={classes!((a.status == 0 || a.status >= 400).then_some("bad"))} data-status={a.status.to_string()}>
                        { format!("{} → {} {}", a.asked, a.status, a.body) }
                    </li>
                }) }
            </ol>
        </section>
    }
}
