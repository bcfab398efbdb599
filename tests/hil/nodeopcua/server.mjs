// A PLC stand-in on an independent OPC UA stack (node-opcua), for the heatloop HIL tests.
//
// It looks like a PLC program's address space, not like heatloop's own simulated PLC: typed
// variables (Float, UInt16, Boolean... as the layout declares), in a namespace whose URI is not
// urn:heatloop:plc and which is registered after other namespaces, so its index is not the one
// a naive client expects and only `nsu=` node ids reach it. It runs the DESIGN §7 watchdog: the
// heartbeat unchanged for watchdog_s writes every output's safe value and sets
// plc_watchdog_tripped; it releases after a steady heartbeat for holdoff_s and a fresh command.
// Like a PLC it powers up tripped.
//
//   node server.mjs --port <n> --layout <layout.json> --pki <folder> [--security none|encrypt]
//
// layout.json: {"namespace_uri", "decoy_namespaces": [...], "watchdog_s", "holdoff_s",
//   "tags": [{"name", "node" ("i=…" | "s=…"), "type" (DataType name), "direction"
//   ("input" | "output"), "value", "safe" (outputs)}]}
//
// It prints "ready <port>" on stdout once listening. Control lines on stdin, one JSON object
// each, answered by one line "json <object>" on stdout:
//   {"cmd": "get"}                      values, commanded and applied outputs, watchdog, sessions
//   {"cmd": "set", "values": {...}}     set input values (as the PLC's field inputs)
//   {"cmd": "reset"}                    session counts start again from the sessions open now
//   {"cmd": "fault", "name": "refuse_subscriptions" | "ignore_subscriptions" | "none"}
//     refuse: CreateSubscription answers BadTooManySubscriptions; ignore: it is never answered.
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { OPCUAServer } from "node-opcua-server";
import { OPCUACertificateManager } from "node-opcua-certificate-manager";
import { nodesets } from "node-opcua-nodesets";
import { MessageSecurityMode, SecurityPolicy } from "node-opcua-secure-channel";
import { StatusCodes } from "node-opcua-status-code";
import { ServiceFault } from "node-opcua-types";
import { DataType, Variant } from "node-opcua-variant";

function args(argv) {
    const out = { security: "none" };
    for (let i = 0; i < argv.length; i += 2) {
        const key = argv[i].replace(/^--/, "");
        if (argv[i + 1] === undefined) throw new Error(`option --${key} needs a value`);
        out[key] = argv[i + 1];
    }
    for (const k of ["port", "layout", "pki"]) {
        if (out[k] === undefined) throw new Error(`option --${k} is required`);
    }
    if (!["none", "encrypt"].includes(out.security)) {
        throw new Error(`--security ${out.security}: expected none or encrypt`);
    }
    return out;
}

const opts = args(process.argv.slice(2));
const layout = JSON.parse(fs.readFileSync(opts.layout, "utf-8"));
const now = () => performance.now() / 1000;

// ---- the DESIGN §7 watchdog (sim/plc_watchdog.py, the same state machine) ----
const wd = {
    timeout_s: layout.watchdog_s,
    holdoff_s: layout.holdoff_s,
    tripped: true,
    trips: 0,
    last_heartbeat: null,
    last_change_s: now(),
    resume_s: null,
    fresh_cmd_s: null,
};

function heartbeat(value, t) {
    if (wd.last_heartbeat !== null && value === wd.last_heartbeat) return;
    const gap = t - wd.last_change_s;
    if (wd.tripped && (wd.resume_s === null || gap >= wd.timeout_s)) wd.resume_s = t;
    wd.last_heartbeat = value;
    wd.last_change_s = t;
}

function poll(t) {
    const silent = t - wd.last_change_s;
    if (!wd.tripped) {
        if (silent >= wd.timeout_s) {
            wd.tripped = true;
            wd.trips += 1;
            wd.resume_s = null;
            wd.fresh_cmd_s = null;
            applySafe();
        }
        return;
    }
    if (wd.resume_s !== null && silent >= wd.timeout_s) wd.resume_s = null;
    if (
        wd.resume_s !== null &&
        t - wd.resume_s >= wd.holdoff_s &&
        wd.fresh_cmd_s !== null &&
        wd.fresh_cmd_s >= wd.resume_s
    ) {
        wd.tripped = false;
        wd.resume_s = null;
        wd.fresh_cmd_s = null;
    }
}

// ---- the process image ----
const tags = new Map(); // name -> {spec, value}
for (const spec of layout.tags) {
    if (DataType[spec.type] === undefined) throw new Error(`tag ${spec.name}: unknown type ${spec.type}`);
    tags.set(spec.name, { spec, value: spec.value });
}

function applySafe() {
    // A PLC program overwrites its command image with the safe values when the watchdog trips.
    for (const { spec } of tags.values()) {
        if (spec.direction === "output" && spec.safe !== undefined && spec.safe !== null) {
            tags.get(spec.name).value = spec.safe;
        }
    }
}

function clientWrite(name, value) {
    const t = now();
    poll(t);
    tags.get(name).value = value;
    if (name === "heartbeat") heartbeat(value, t);
    else wd.fresh_cmd_s = t;
    poll(t);
}

function readValue(name) {
    if (name === "plc_watchdog_tripped") return wd.tripped;
    if (name === "plc_watchdog_trips") return Math.min(wd.trips, 0xffff);
    return tags.get(name).value;
}

// ---- the server ----
const pki = path.resolve(opts.pki);
const certificateManager = new OPCUACertificateManager({
    rootFolder: path.join(pki, "server"),
    // The client's certificate is not what these tests prove (heatloop's trust in the PLC is).
    automaticallyAcceptUnknownCertificate: true,
});
await certificateManager.initialize();

const encrypt = opts.security === "encrypt";
const server = new OPCUAServer({
    port: Number(opts.port),
    hostname: "127.0.0.1",
    resourcePath: "/",
    nodeset_filename: [nodesets.standard],
    serverCertificateManager: certificateManager,
    serverInfo: { applicationUri: "urn:nodeopcua:heatloop-stand-in", productUri: "heatloop-stand-in" },
    securityPolicies: encrypt ? [SecurityPolicy.Basic256Sha256] : [SecurityPolicy.None],
    securityModes: encrypt ? [MessageSecurityMode.SignAndEncrypt] : [MessageSecurityMode.None],
    allowAnonymous: true,
    serverCapabilities: { maxSessions: 2 },
    buildInfo: { productName: "heatloop PLC stand-in (node-opcua)" },
});
await server.initialize();

const addressSpace = server.engine.addressSpace;
for (const uri of layout.decoy_namespaces ?? []) addressSpace.registerNamespace(uri);
const ns = addressSpace.registerNamespace(layout.namespace_uri);
const folder = ns.addObject({ organizedBy: addressSpace.rootFolder.objects, browseName: "DB_Heat" });

for (const { spec } of tags.values()) {
    const dataType = DataType[spec.type];
    ns.addVariable({
        componentOf: folder,
        browseName: spec.name,
        nodeId: `ns=${ns.index};${spec.node}`,
        dataType,
        accessLevel: spec.direction === "output" ? "CurrentRead | CurrentWrite" : "CurrentRead",
        userAccessLevel: spec.direction === "output" ? "CurrentRead | CurrentWrite" : "CurrentRead",
        minimumSamplingInterval: 50,
        value: {
            get: () => new Variant({ dataType, value: readValue(spec.name) }),
            // node-opcua answers BadTypeMismatch before this for a variant of another type
            set: (variant) => {
                clientWrite(spec.name, variant.value);
                return StatusCodes.Good;
            },
        },
    });
}

// Sessions: the count now, the most ever open, and how each one ended.
const sessions = { open: 0, max_open: 0, created: 0, closed: {}, refused: 0 };
server.on("create_session", (session) => {
    sessions.created += 1;
    sessions.open = server.currentSessionCount;
    sessions.max_open = Math.max(sessions.max_open, sessions.open);
    session.on("session_closed", (_s, _del, reason) => {
        const why = String(reason ?? "unknown");
        sessions.closed[why] = (sessions.closed[why] ?? 0) + 1;
    });
});
server.on("session_closed", () => {
    sessions.open = server.currentSessionCount;
});

// Faults on CreateSubscription: a failed connect (refused) and an abandoned one (never answered).
let fault = "none";
const createSubscription = server._on_CreateSubscriptionRequest.bind(server);
server._on_CreateSubscriptionRequest = (message, channel) => {
    if (fault === "ignore_subscriptions") return;
    if (fault === "refuse_subscriptions") {
        const response = new ServiceFault({
            responseHeader: { serviceResult: StatusCodes.BadTooManySubscriptions },
        });
        channel.send_response("MSG", response, message);
        return;
    }
    createSubscription(message, channel);
};
const createSession = server._on_CreateSessionRequest.bind(server);
server._on_CreateSessionRequest = async (message, channel) => {
    if (server.currentSessionCount >= 2) sessions.refused += 1; // BadTooManySessions follows
    return createSession(message, channel);
};

await server.start();
setInterval(() => poll(now()), 20);

function state() {
    const values = {};
    for (const name of tags.keys()) values[name] = readValue(name);
    const applied = {};
    for (const { spec } of tags.values()) {
        if (spec.direction === "output") {
            applied[spec.name] = wd.tripped && spec.safe != null ? spec.safe : tags.get(spec.name).value;
        }
    }
    return {
        values,
        applied,
        tripped: wd.tripped,
        trips: wd.trips,
        heartbeat: wd.last_heartbeat,
        silent_s: now() - wd.last_change_s, // since the heartbeat last changed
        namespace_index: ns.index,
        sessions: { ...sessions, open: server.currentSessionCount },
        fault,
    };
}

function answer(obj) {
    process.stdout.write(`json ${JSON.stringify(obj)}\n`);
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
    try {
        const req = JSON.parse(line);
        poll(now());
        if (req.cmd === "get") answer(state());
        else if (req.cmd === "set") {
            for (const [name, value] of Object.entries(req.values)) {
                const tag = tags.get(name);
                if (tag === undefined || tag.spec.direction !== "input") {
                    throw new Error(`set ${name}: not an input tag of the layout`);
                }
                tag.value = value;
            }
            answer(state());
        } else if (req.cmd === "reset") {
            const open = server.currentSessionCount;
            Object.assign(sessions, { open, max_open: open, created: 0, closed: {}, refused: 0 });
            answer(state());
        } else if (req.cmd === "fault") {
            if (!["none", "refuse_subscriptions", "ignore_subscriptions"].includes(req.name)) {
                throw new Error(`fault ${req.name}: unknown`);
            }
            fault = req.name;
            answer(state());
        } else throw new Error(`unknown cmd ${JSON.stringify(req.cmd)}`);
    } catch (e) {
        answer({ error: String(e.message ?? e) });
    }
});
process.stdin.on("end", async () => {
    await server.shutdown(0);
    process.exit(0);
});
for (const sig of ["SIGTERM", "SIGINT"]) {
    process.on(sig, async () => {
        await server.shutdown(0);
        process.exit(0);
    });
}

process.stdout.write(`ready ${opts.port}\n`);
