// A BMS client on an independent OPC UA stack (node-opcua-client), for the heatloop HIL tests
// and as a worked example for integrators (docs/bms.md): what a non-Python BMS does against
// heatloop's BMS server.
//
//   node client.mjs --endpoint opc.tcp://host:port/heatloop --pki <folder>
//                   [--user NAME] [--password PW | env HEATLOOP_BMS_PASSWORD]
//                   [--server-cert <cert.der>] [--mode SignAndEncrypt|Sign]
//                   <command> [arguments]
//
// Commands (node ids are "s=HeatLoop.…" in the urn:heatloop namespace, or any full node id):
//   cert                              make the client's PKI and certificate, print its paths
//   endpoints                         the server's endpoints (policy, mode, user token types)
//   browse [root]                     every node below Objects/HeatLoop (or root), recursively
//   read <id>...                      value, status code, source timestamp of each
//   subscribe <seconds> <ms> <id>...  monitor the ids at <ms> and print each notification
//   write <id> <value> [<type>]       write (type Double by default; Boolean, String...)
//
// Security: Basic256Sha256 with SignAndEncrypt (Sign with --mode Sign), a username token. The
// client's own certificate is created on first use in <pki>/own/certs and must be trusted by
// the server (copy <pki>/own/certs/client_cert.der to the server's pki/bms/trusted/). The server's
// certificate is trusted only if given with --server-cert (what an integrator does after
// checking its thumbprint), never on first use.
//
// Output: one JSON object per line on stdout. Errors: {"error": "..."} and exit code 1.
import fs from "node:fs";
import path from "node:path";
import { OPCUACertificateManager } from "node-opcua-certificate-manager";
import {
    AttributeIds,
    BrowseDirection,
    ClientMonitoredItem,
    ClientSubscription,
    DataType,
    MessageSecurityMode,
    NodeClass,
    OPCUAClient,
    SecurityPolicy,
    TimestampsToReturn,
    UserTokenType,
} from "node-opcua-client";

const NAMESPACE_URI = "urn:heatloop";

function out(obj) {
    process.stdout.write(JSON.stringify(obj) + "\n");
}

function parse(argv) {
    const o = { mode: "SignAndEncrypt", rest: [] };
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a.startsWith("--")) {
            const key = a.slice(2);
            if (argv[i + 1] === undefined) throw new Error(`option --${key} needs a value`);
            o[key.replace(/-(.)/g, (_, c) => c.toUpperCase())] = argv[++i];
        } else {
            o.rest.push(a);
        }
    }
    if (o.password === undefined && process.env.HEATLOOP_BMS_PASSWORD !== undefined) {
        o.password = process.env.HEATLOOP_BMS_PASSWORD;
    }
    for (const k of ["endpoint", "pki"]) {
        if (o[k] === undefined) throw new Error(`option --${k} is required`);
    }
    if (!["SignAndEncrypt", "Sign"].includes(o.mode)) {
        throw new Error(`--mode ${o.mode}: expected SignAndEncrypt or Sign`);
    }
    if (o.rest.length === 0) throw new Error("a command is required (cert, endpoints, browse, read, subscribe, write)");
    return o;
}

// A status code as a BMS shows it: its name and its 32-bit value.
function status(sc) {
    return { status: sc.name, code: sc.value >>> 0 };
}

function jsonValue(v) {
    if (v === null || v === undefined) return null;
    if (v instanceof Date) return v.toISOString();
    if (Array.isArray(v) || ArrayBuffer.isView(v)) return Array.from(v, jsonValue);
    if (typeof v === "bigint") return Number(v);
    if (typeof v === "object" && "toString" in v && v.constructor?.name !== "Object") return v.toString();
    return v;
}

function dataValue(nodeId, dv) {
    const v = dv.value;
    return {
        nodeId,
        value: v && v.dataType !== DataType.Null ? jsonValue(v.value) : null,
        dataType: v ? DataType[v.dataType] : null,
        ...status(dv.statusCode),
        sourceTimestamp: dv.sourceTimestamp ? dv.sourceTimestamp.toISOString() : null,
    };
}

async function certificateManager(pki) {
    const cm = new OPCUACertificateManager({
        rootFolder: path.resolve(pki),
        automaticallyAcceptUnknownCertificate: false, // a server is trusted only by --server-cert
    });
    await cm.initialize();
    return cm;
}

function makeClient(cm, o) {
    return OPCUAClient.create({
        applicationName: "heatloop-nodeopcua-bms",
        applicationUri: "urn:heatloop:test:nodeopcua-bms",
        clientCertificateManager: cm,
        securityMode: MessageSecurityMode[o.mode],
        securityPolicy: SecurityPolicy.Basic256Sha256,
        endpointMustExist: false,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        requestedSessionTimeout: 60000,
        keepSessionAlive: true,
    });
}

// The client's certificate as DER next to node-opcua's PEM, so a server's trust folder can take it.
async function ensureCert(cm, o) {
    const client = makeClient(cm, o);
    await client.createDefaultCertificate();
    const pem = fs.readFileSync(client.certificateFile, "utf-8");
    const b64 = pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
    const der = path.join(path.dirname(client.certificateFile), "client_cert.der");
    fs.writeFileSync(der, Buffer.from(b64, "base64"));
    return { pem: client.certificateFile, der };
}

// "s=…" and "nsu=urn:heatloop;s=…" (as docs/bms.md lists them) become "ns=<index>;s=…".
function resolve(id, nsIndex) {
    const prefix = `nsu=${NAMESPACE_URI};`;
    if (id.startsWith(prefix)) id = id.slice(prefix.length);
    if (id.startsWith("s=") || id.startsWith("i=")) return `ns=${nsIndex};${id}`;
    return id;
}

async function browseTree(session, nodeId, prefix, depth) {
    if (depth > 8) return;
    const res = await session.browse({
        nodeId,
        browseDirection: BrowseDirection.Forward,
        referenceTypeId: "HierarchicalReferences",
        includeSubtypes: true,
        nodeClassMask: 0,
        resultMask: 63,
    });
    for (const r of res.references || []) {
        const name = r.browseName.name;
        const p = prefix ? `${prefix}/${name}` : name;
        const id = r.nodeId.toString();
        out({ path: p, nodeId: id, nodeClass: NodeClass[r.nodeClass] });
        if (r.nodeClass === NodeClass.Object) await browseTree(session, r.nodeId, p, depth + 1);
    }
}

function variant(valueText, typeName) {
    const dataType = DataType[typeName];
    if (dataType === undefined) throw new Error(`type ${typeName}: expected an OPC UA DataType name`);
    let value;
    if (dataType === DataType.Boolean) value = valueText === "true";
    else if (dataType === DataType.String) value = valueText;
    else value = Number(valueText);
    return { dataType, value };
}

async function run(o) {
    const [cmd, ...args] = o.rest;
    const cm = await certificateManager(o.pki);
    const cert = await ensureCert(cm, o);
    if (cmd === "cert") {
        out(cert);
        return;
    }
    if (o.serverCert !== undefined) {
        await cm.trustCertificate(fs.readFileSync(o.serverCert));
    }
    const client = makeClient(cm, o);
    if (cmd === "endpoints") {
        await client.connect(o.endpoint);
        for (const e of await client.getEndpoints()) {
            out({
                endpointUrl: e.endpointUrl,
                securityPolicyUri: e.securityPolicyUri,
                securityMode: MessageSecurityMode[e.securityMode],
                userTokens: (e.userIdentityTokens || []).map((t) => UserTokenType[t.tokenType]),
            });
        }
        await client.disconnect();
        return;
    }
    await client.connect(o.endpoint);
    let session;
    try {
        session = await client.createSession(
            o.user === undefined
                ? { type: UserTokenType.Anonymous }
                : { type: UserTokenType.UserName, userName: o.user, password: o.password ?? "" },
        );
    } catch (e) {
        await client.disconnect();
        throw e;
    }
    try {
        const nsArray = await session.readNamespaceArray();
        const ns = nsArray.indexOf(NAMESPACE_URI);
        if (ns < 0) throw new Error(`namespace ${NAMESPACE_URI} not on the server: ${nsArray.join(", ")}`);
        out({
            session: "open",
            namespaceIndex: ns,
            user: o.user ?? null,
            securityMode: MessageSecurityMode[client.securityMode],
            securityPolicy: client.securityPolicy,
        });
        if (cmd === "browse") {
            await browseTree(session, resolve(args[0] ?? "s=HeatLoop", ns), "", 0);
        } else if (cmd === "read") {
            const ids = args.map((a) => resolve(a, ns));
            const dvs = await session.read(ids.map((nodeId) => ({ nodeId, attributeId: AttributeIds.Value })));
            dvs.forEach((dv, k) => out(dataValue(args[k], dv)));
        } else if (cmd === "subscribe") {
            const [seconds, ms, ...ids] = args;
            const sub = await ClientSubscription.create(session, {
                requestedPublishingInterval: Number(ms),
                requestedLifetimeCount: 600,
                requestedMaxKeepAliveCount: 20,
                maxNotificationsPerPublish: 0,
                publishingEnabled: true,
                priority: 10,
            });
            out({ subscription: sub.subscriptionId, publishingInterval: sub.publishingInterval });
            for (const id of ids) {
                const item = ClientMonitoredItem.create(
                    sub,
                    { nodeId: resolve(id, ns), attributeId: AttributeIds.Value },
                    { samplingInterval: Number(ms), discardOldest: true, queueSize: 10 },
                    TimestampsToReturn.Both,
                );
                item.on("changed", (dv) => out({ notification: true, ...dataValue(id, dv) }));
                item.on("err", (msg) => out({ nodeId: id, monitorError: String(msg) }));
            }
            await new Promise((r) => setTimeout(r, Number(seconds) * 1000));
            await sub.terminate();
        } else if (cmd === "write") {
            const [id, valueText, typeName = "Double"] = args;
            const sc = await session.write({
                nodeId: resolve(id, ns),
                attributeId: AttributeIds.Value,
                value: { value: variant(valueText, typeName) },
            });
            out({ nodeId: id, write: valueText, ...status(sc) });
        } else {
            throw new Error(`command ${cmd}: expected cert, endpoints, browse, read, subscribe or write`);
        }
    } finally {
        await session.close();
        await client.disconnect();
    }
}

let opts;
try {
    opts = parse(process.argv.slice(2));
    await run(opts);
    process.exit(0);
} catch (e) {
    out({ error: String(e && e.message ? e.message : e).split("\n")[0] });
    process.exit(1);
}
