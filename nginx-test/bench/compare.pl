# The benchmark behind nginx-test/bench/compare: nginx-edge side by side with the same nginx
# binary using ssl_preread + map, HAProxy and sniproxy, and with the backend reached directly.
# Every proxy runs one worker (one thread); wrk runs one thread. Prints tables to stdout.
#
# Environment: EDGE_NGINX (nginx built with --with-stream_ssl_preread_module), EDGE_MODULE,
# BENCH_SECONDS (4 per run), BENCH_ROUNDS (3), BENCH_CONNS (32).
use strict;
use warnings;
use File::Temp ();
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Time::HiRes qw(time sleep);

my $nginx = $ENV{EDGE_NGINX} or die "EDGE_NGINX is not set\n";
my $module = $ENV{EDGE_MODULE} or die "EDGE_MODULE is not set\n";
my $seconds = $ENV{BENCH_SECONDS} // 4;
my $rounds = $ENV{BENCH_ROUNDS} // 3;
my $conns = $ENV{BENCH_CONNS} // 32;
my $dir = File::Temp::tempdir('edge-bench-XXXXXX', TMPDIR => 1, CLEANUP => !$ENV{BENCH_KEEP});
chmod 0755, $dir;
my $user = $> == 0 ? "user nobody nogroup;" : '';

sub port {
    my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0, ReuseAddr => 1)
        or die "port: $!";
    my $p = $s->sockport;
    close $s;
    return $p;
}
sub write_file { my ($name, $text) = @_; open my $f, '>', "$dir/$name" or die "$name: $!"; print $f $text; close $f; chmod 0644, "$dir/$name"; "$dir/$name" }
sub slurp { my ($path) = @_; open my $f, '<', $path or return ''; local $/; scalar <$f> }
sub wait_port {
    my ($port, $what) = @_;
    my $deadline = time + 60;
    until (IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 1)) {
        die "$what did not listen on $port\n" if time > $deadline;
        sleep 0.05;
    }
}

my %procs;
sub start {
    my ($name, @cmd) = @_;
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        open STDOUT, '>', "$dir/$name.out";
        open STDERR, '>&', \*STDOUT;
        exec @cmd;
        exit 127;
    }
    $procs{$name} = $pid;
}
sub stop {
    my ($name, $signal) = @_;
    my $pid = delete $procs{$name} or return;
    kill $signal // 'TERM', $pid;
    waitpid($pid, 0);
}
END { local $?; kill 'TERM', values %procs; waitpid($_, 0) for values %procs }

# Children of a master (nginx, haproxy -W): their RSS in KiB.
sub worker_rss {
    my ($master) = @_;
    my @rss;
    for my $p (map { m{/proc/(\d+)} } <"/proc/[0-9]*">) {
        my $stat = slurp("/proc/$p/stat");
        next unless $stat =~ /^\d+ \(.*?\) \S (\d+)/ && $1 == $master;
        my ($kb) = slurp("/proc/$p/status") =~ /VmRSS:\s+(\d+)/;
        push @rss, $kb if $kb;
    }
    return @rss ? $rss[0] : (slurp("/proc/$master/status") =~ /VmRSS:\s+(\d+)/)[0];
}

system("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 2 "
    . "-keyout $dir/b.key -out $dir/b.crt 2>/dev/null") == 0 or die "openssl\n";
chmod 0644, "$dir/b.key";

# --- The backend: nginx http, one worker, HTTPS and HTTP answering "ok".
my ($b_tls, $b_http) = (port(), port());
write_file('backend.conf', <<"EOF");
$user
worker_processes 1; daemon off; pid $dir/backend.pid; error_log $dir/backend.err;
events { worker_connections 8192; }
http {
    access_log off; keepalive_requests 1000000;
    server { listen 127.0.0.1:$b_tls ssl; ssl_certificate $dir/b.crt; ssl_certificate_key $dir/b.key;
             location / { return 200 "ok\\n"; } }
    server { listen 127.0.0.1:$b_http; location / { return 200 "ok\\n"; } }
}
EOF
start('backend', $nginx, '-p', "$dir/", '-c', "$dir/backend.conf", '-e', "$dir/backend.err");
wait_port($b_tls, 'backend');

# Route names: "localhost" (the name wrk sends as SNI) in the middle of the table.
sub names {
    my ($n) = @_;
    my @names = map { "host$_.bench.test" } 1 .. $n - 1;
    splice @names, int(@names / 2), 0, 'localhost';
    return @names;
}

sub edge_routes {
    my ($n, $file) = @_;
    my $routes = join ",\n", map { qq{    "$_": {"tls": "tlsback", "http": "httpback"}} } names($n);
    write_file($file, qq({\n  "upstreams": {"tlsback": {"servers": ["127.0.0.1:$b_tls"]},\n)
        . qq(                "httpback": {"servers": ["127.0.0.1:$b_http"]}},\n  "routes": {\n$routes\n  }\n}\n));
}

# HAProxy's frame: one thread, TCP mode, the timeouts every config shares.
my $haproxy_head = <<'CFG';
global
    nbthread 1
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
CFG

# Starts every proxy for a table of $n names; returns {config => {tls => port, http => port}}.
sub start_proxies {
    my ($n, @which) = @_;
    my %want = map { $_ => 1 } @which;
    my %ports = (direct => {tls => $b_tls, http => $b_http});
    if ($want{'nginx-edge'}) {
        my ($t, $h) = (port(), port());
        edge_routes($n, 'routes.json');
        write_file('edge.conf', <<"EOF");
load_module $module;
$user
worker_processes 1; daemon off; pid $dir/edge.pid; error_log $dir/edge.err notice;
events { worker_connections 8192; }
stream {
    edge_routes $dir/routes.json interval=1s;
    server { listen 127.0.0.1:$t; edge_route tls;  proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:$h; edge_route http; proxy_pass \$edge_upstream; }
}
EOF
        start('nginx-edge', $nginx, '-p', "$dir/", '-c', "$dir/edge.conf", '-e', "$dir/edge.err");
        wait_port($t, 'nginx-edge');
        $ports{'nginx-edge'} = {tls => $t, http => $h};
    }
    if ($want{'nginx map'}) {
        my $t = port();
        my $map = join '', map { "        $_ tlsback;\n" } names($n);
        write_file('map.conf', <<"EOF");
$user
worker_processes 1; daemon off; pid $dir/map.pid; error_log $dir/map.err notice;
events { worker_connections 8192; }
stream {
    map_hash_max_size 1048576; map_hash_bucket_size 128;
    map \$ssl_preread_server_name \$backend {
$map    }
    upstream tlsback { server 127.0.0.1:$b_tls; }
    server { listen 127.0.0.1:$t; ssl_preread on; proxy_pass \$backend; }
}
EOF
        start('nginx map', $nginx, '-p', "$dir/", '-c', "$dir/map.conf", '-e', "$dir/map.err");
        wait_port($t, 'nginx map');
        $ports{'nginx map'} = {tls => $t};
    }
    if ($want{haproxy}) {
        my ($t, $h) = (port(), port());
        write_file('sni.map', join('', map { "$_ tlsback\n" } names($n)));
        write_file('host.map', join('', map { "$_ httpback\n" } names($n)));
        write_file('haproxy.cfg', $haproxy_head . <<"EOF");
frontend tls
    bind 127.0.0.1:$t
    tcp-request inspect-delay 5s
    tcp-request content accept if { req_ssl_hello_type 1 }
    use_backend %[req.ssl_sni,lower,map($dir/sni.map)]
frontend http
    bind 127.0.0.1:$h
    tcp-request inspect-delay 5s
    tcp-request content accept if HTTP
    use_backend %[req.hdr(host),field(1,:),lower,map($dir/host.map)]
backend tlsback
    server s1 127.0.0.1:$b_tls
backend httpback
    server s1 127.0.0.1:$b_http
EOF
        start('haproxy', 'haproxy', '-W', '-db', '-f', "$dir/haproxy.cfg");
        wait_port($t, 'haproxy');
        $ports{haproxy} = {tls => $t, http => $h};
    }
    if ($want{sniproxy}) {
        my ($t, $h) = (port(), port());
        my $tls_table = join '', map { (my $q = $_) =~ s/\./\\\\./g; "    ^$q\$ 127.0.0.1:$b_tls\n" } names($n);
        my $http_table = join '', map { (my $q = $_) =~ s/\./\\\\./g; "    ^$q\$ 127.0.0.1:$b_http\n" } names($n);
        write_file('sniproxy.conf', <<"EOF");
user nobody
pidfile $dir/sniproxy.pid
error_log {
    filename $dir/sniproxy.err
    priority notice
}
listener 127.0.0.1:$t {
    protocol tls
    table tls_table
}
listener 127.0.0.1:$h {
    protocol http
    table http_table
}
table tls_table {
$tls_table}
table http_table {
$http_table}
EOF
        start('sniproxy', 'sniproxy', '-f', '-c', "$dir/sniproxy.conf");
        wait_port($t, 'sniproxy');
        $ports{sniproxy} = {tls => $t, http => $h};
    }
    return \%ports;
}

sub stop_proxies {
    stop('nginx-edge', 'QUIT');
    stop('nginx map', 'QUIT');
    stop('haproxy');
    stop('sniproxy');
}

# One wrk run: (requests/s, p99 ms, errors).
sub wrk {
    my ($load, $port) = @_;
    my @args = ('-t1', "-c$conns", "-d${seconds}s", '--latency');
    my $url;
    if ($load eq 'tls new conn') { push @args, '-H', 'Connection: close'; $url = "https://localhost:$port/" }
    elsif ($load eq 'tls keep-alive') { $url = "https://localhost:$port/" }
    else { push @args, '-H', 'Connection: close', '-H', 'Host: localhost'; $url = "http://127.0.0.1:$port/" }
    open my $fh, '-|', 'wrk', @args, $url or die "wrk: $!";
    my $out = do { local $/; <$fh> } // '';
    close $fh;
    my ($rps) = $out =~ /Requests\/sec:\s+([\d.]+)/;
    my ($p99, $unit) = $out =~ /^\s+99%\s+([\d.]+)(us|ms|s)\b/m;
    $p99 = defined $p99 ? $p99 * {us => 0.001, ms => 1, s => 1000}->{$unit} : 0;
    my $errors = 0;
    $errors += $_ for $out =~ /(?:connect|read|write|timeout) (\d+)/g;
    $errors += $1 if $out =~ /Non-2xx or 3xx responses: (\d+)/;
    my ($requests) = $out =~ /(\d+) requests in/;
    return ($rps // 0, $p99, $errors, $requests // 0);
}

# CPU time (user + system, in clock ticks) of a process and its children (a master's workers).
sub cpu_ticks {
    my ($root) = @_;
    my $ticks = 0;
    for my $stat (glob '/proc/[0-9]*/stat') {
        my $line = slurp($stat);
        my ($pid, $rest) = $line =~ /^(\d+) \(.*\) (.*)$/ or next;
        my @f = split ' ', $rest;    # fields from the state on: ppid is $f[1], utime $f[11]
        next unless $pid == $root || $f[1] == $root;
        $ticks += $f[11] + $f[12];
    }
    return $ticks;
}
my $tick_us = 1e6 / (POSIX::sysconf(POSIX::_SC_CLK_TCK()) || 100);

sub median { my @s = sort { $a <=> $b } @_; return $s[int(@s / 2)] }

my @loads = ('tls new conn', 'tls keep-alive', 'http new conn');
my @rows;
# BENCH_SIZES (e.g. "10"), for a shorter run; "none" keeps only the failover figures.
my @sizes = grep { /^\d+$/ } split /,/, ($ENV{BENCH_SIZES} // "10,10000,100000");
for my $size (@sizes) {
    my @configs = $size == 100_000 ? ('direct', 'nginx-edge', 'nginx map')
                                    : ('direct', 'nginx-edge', 'nginx map', 'haproxy', 'sniproxy');
    my $ports = start_proxies($size, @configs);
    my %runs;
    for my $round (1 .. $rounds) {
        my @order = $round % 2 ? @configs : reverse @configs;
        for my $load (@loads) {
            for my $config (@order) {
                my $port = $ports->{$config}{$load =~ /^tls/ ? 'tls' : 'http'} or next;
                # The proxy's own CPU per request: steadier than req/s when wrk, the proxy
                # and the backend share two cores.
                my $pid = $procs{$config};
                my $before = $pid ? cpu_ticks($pid) : 0;
                my @r = wrk($load, $port);
                my $cpu = $pid && $r[3] ? (cpu_ticks($pid) - $before) * $tick_us / $r[3] : 0;
                push @{$runs{$load}{$config}}, [@r[0 .. 2], $cpu];
            }
        }
    }
    my %rss = map { $_ => worker_rss($procs{$_}) } grep { $procs{$_} } @configs;
    for my $load (@loads) {
        my $map = $runs{$load}{'nginx map'} ? median(map { $_->[0] } @{$runs{$load}{'nginx map'}}) : 0;
        my $map_cpu = $runs{$load}{'nginx map'} ? median(map { $_->[3] } @{$runs{$load}{'nginx map'}}) : 0;
        my $direct = median(map { $_->[0] } @{$runs{$load}{direct}});
        for my $config (@configs) {
            my $r = $runs{$load}{$config} or next;
            my @rps = map { $_->[0] } @$r;
            my $med = median(@rps);
            my $cpu = median(map { $_->[3] } @$r);
            push @rows, sprintf "%-15s %7s  %-11s %9.0f  %9.0f-%-9.0f %7.2f  %7s  %7.2f  %6d  %8s  %7s  %7s",
                $load, $size, $config, $med, (sort { $a <=> $b } @rps)[0, -1],
                median(map { $_->[1] } @$r), $map ? sprintf('%.3f', $med / $map) : '-',
                $direct ? $med / $direct : 0, (0 + eval { my $e = 0; $e += $_->[2] for @$r; $e }),
                $rss{$config} ? "$rss{$config}k" : '-', $cpu ? sprintf('%.1f', $cpu) : '-',
                $cpu && $map_cpu ? sprintf('%.3f', $cpu / $map_cpu) : '-';
        }
    }
    push @rows, '';

    # Reload figures at the largest size only.
    if ($size == 100_000) {
        my (@stall, @build);
        for my $i (1 .. 3) {
            my $before = () = slurp("$dir/edge.err") =~ /in service; this worker's event loop spent/g;
            edge_routes($size, 'routes.json.tmp');
            # A different mtime or size: change the file a little each time.
            open my $f, '>>', "$dir/routes.json.tmp"; print $f ' ' x $i; close $f;
            rename "$dir/routes.json.tmp", "$dir/routes.json";
            my $deadline = time + 60;
            sleep 0.05 until (() = slurp("$dir/edge.err") =~ /in service; this worker's event loop spent/g) > $before
                || time > $deadline;
            my @busy = slurp("$dir/edge.err") =~ /event loop spent ([\d.]+) ms/g;
            my @wall = slurp("$dir/edge.err") =~ /table \d+ loaded, .* in ([\d.]+) ms/g;
            push @stall, $busy[-1];
            push @build, $wall[-1];
        }
        my $rss_after = worker_rss($procs{'nginx-edge'});
        my $map_master = $procs{'nginx map'};
        my $start = time;
        my $before = () = slurp("$dir/map.err") =~ /start worker process/g;
        kill 'HUP', $map_master;
        sleep 0.01 until (() = slurp("$dir/map.err") =~ /start worker process/g) > $before || time > $start + 120;
        my $map_reload = (time - $start) * 1000;
        # haproxy.cfg is the 10,000-name run's; its maps now get 100,000 lines each.
        write_file('sni.map', join('', map { "$_ tlsback\n" } names($size)));
        write_file('host.map', join('', map { "$_ httpback\n" } names($size)));
        $start = time;
        system("haproxy -c -q -f $dir/haproxy.cfg >/dev/null 2>&1");
        my $haproxy_load = (time - $start) * 1000;
        push @rows, sprintf('reload, 100,000 routes: nginx-edge file swap, worker event loop busy %s ms (median %.2f), '
            . 'table built on a thread in %s ms; worker RSS after 3 swaps %dk',
            join('/', map { sprintf '%.2f', $_ } @stall), median(@stall), join('/', map { sprintf '%.0f', $_ } @build),
            $rss_after);
        push @rows, sprintf('                       nginx -s reload of the map: %.0f ms until the new worker starts '
            . '(master parses, old worker keeps serving)', $map_reload);
        push @rows, sprintf('                       haproxy -c with the 100,000-line map (its reload parse): %.0f ms',
            $haproxy_load);
        push @rows, '';
    }
    stop_proxies();
}

# --- Failover: TLS, a new connection per request, while one of three backends is killed
# (SIGKILL: its socket closes, later connects are refused) two seconds into a 6 s run.
my @fb = map { port() } 1 .. 3;
sub start_fb {
    my ($i) = @_;
    write_file("fb$i.conf", <<"CONF");
$user
master_process off; daemon off; pid $dir/fb$i.pid; error_log $dir/fb$i.err;
events { worker_connections 8192; }
http { access_log off;
    server { listen 127.0.0.1:$fb[$i] ssl; ssl_certificate $dir/b.crt; ssl_certificate_key $dir/b.key;
             location / { return 200 "ok\\n"; } } }
CONF
    start("fb$i", $nginx, '-p', "$dir/", '-c', "$dir/fb$i.conf", '-e', "$dir/fb$i.err");
    wait_port($fb[$i], "backend $i");
}
start_fb($_) for 0 .. 2;
my %fo;
{
    my ($e, $m, $h) = (port(), port(), port());
    my $servers = join ', ', map { qq("127.0.0.1:$_") } @fb;
    write_file('fo-routes.json', qq({"upstreams": {"three": {"servers": [$servers]}}, "routes": {"localhost": "three"}}\n));
    write_file('fo-edge.conf', <<"CONF");
load_module $module;
$user
worker_processes 1; daemon off; pid $dir/fo-edge.pid; error_log $dir/fo-edge.err notice;
events { worker_connections 8192; }
stream { edge_routes $dir/fo-routes.json;
    server { listen 127.0.0.1:$e; edge_route tls; proxy_pass \$edge_upstream; } }
CONF
    my $up = join '', map { "        server 127.0.0.1:$_;\n" } @fb;
    write_file('fo-map.conf', <<"CONF");
$user
worker_processes 1; daemon off; pid $dir/fo-map.pid; error_log $dir/fo-map.err notice;
events { worker_connections 8192; }
stream { map \$ssl_preread_server_name \$backend { localhost three; }
    upstream three {
$up    }
    server { listen 127.0.0.1:$m; ssl_preread on; proxy_pass \$backend; } }
CONF
    my $hs = join '', map { "    server s$_ 127.0.0.1:$fb[$_] check inter 2s\n" } 0 .. 2;
    write_file('fo-haproxy.cfg', $haproxy_head . <<"CONF");
    retries 3
    option redispatch
frontend tls
    bind 127.0.0.1:$h
    tcp-request inspect-delay 5s
    tcp-request content accept if { req_ssl_hello_type 1 }
    use_backend three if { req.ssl_sni -i localhost }
backend three
$hs
CONF
    start('fo nginx-edge', $nginx, '-p', "$dir/", '-c', "$dir/fo-edge.conf", '-e', "$dir/fo-edge.err");
    start('fo nginx map', $nginx, '-p', "$dir/", '-c', "$dir/fo-map.conf", '-e', "$dir/fo-map.err");
    start('fo haproxy', 'haproxy', '-W', '-db', '-f', "$dir/fo-haproxy.cfg");
    wait_port($_, 'failover proxy') for $e, $m, $h;
    for my $config (['nginx-edge', $e], ['nginx map', $m], ['haproxy', $h]) {
        my ($name, $port) = @$config;
        start_fb(1) unless $procs{fb1};
        sleep 3;    # let HAProxy's checks see it up again
        open my $wrk, '-|', 'wrk', '-t1', "-c$conns", '-d6s', '-H', 'Connection: close',
            "https://localhost:$port/" or die "wrk: $!";
        sleep 2;
        kill 'KILL', $procs{fb1};
        waitpid(delete $procs{fb1}, 0);
        my $out = do { local $/; <$wrk> } // '';
        close $wrk;
        my ($requests) = $out =~ /(\d+) requests in/;
        my $errors = 0;
        $errors += $_ for $out =~ /(?:connect|read|write|timeout) (\d+)/g;
        $errors += $1 if $out =~ /Non-2xx or 3xx responses: (\d+)/;
        $fo{$name} = [$requests // 0, $errors];
    }
    stop($_, 'QUIT') for 'fo nginx-edge', 'fo nginx map';
    stop('fo haproxy');
}
stop("fb$_") for 0 .. 2;
push @rows, 'failover: TLS, new connection per request, one of 3 backends SIGKILLed 2 s into a 6 s wrk run';
push @rows, sprintf('          %-11s %7d requests, %d client-visible errors', $_, @{$fo{$_}}) for 'nginx-edge', 'nginx map', 'haproxy';
push @rows, '          sniproxy: one address per name, nothing to fail over to';
push @rows, '';

my $cpu = (slurp('/proc/cpuinfo') =~ /model name\s*:\s*(.*)/)[0] // '?';
my $ncpu = () = slurp('/proc/cpuinfo') =~ /^processor/mg;
my ($nv) = `$nginx -v 2>&1` =~ m{nginx/(\S+)};
my ($hv) = `haproxy -v 2>&1` =~ /version (\S+)/;
my ($sv) = `sniproxy -V 2>&1` =~ /(\d[\d.]*)/;
my ($wv) = `wrk -v 2>&1` =~ /wrk (\S+)/;
print "machine: $cpu, $ncpu CPU(s); nginx $nv, haproxy $hv, sniproxy " . ($sv // '?') . ", wrk " . ($wv // '?') . "\n";
print "each proxy: 1 worker/thread; wrk: 1 thread, $conns connections, ${seconds}s per run, $rounds rounds alternating the order\n";
print "backend: nginx (1 worker) answering 'ok' over HTTPS and HTTP on loopback; SNI/Host 'localhost' in the middle of the table\n\n";
printf "%-15s %7s  %-11s %9s  %-19s %7s  %7s  %7s  %6s  %8s  %7s  %7s\n",
    'load', 'routes', 'config', 'req/s', 'min-max', 'p99 ms', 'vs map', 'vs dir', 'errors', 'RSS', 'cpu us', 'cpu/map';
print "(cpu us: the proxy's own CPU time per request, median; cpu/map: that against nginx map)\n";
print "$_\n" for @rows;
