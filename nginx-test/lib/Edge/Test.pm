package Edge::Test;

# A small Test::Nginx-style harness: writes nginx.conf from a template with free ports and the
# test directory filled in, starts the nginx under test with the module, talks to it like
# clients do, and stops it at the end, keeping the logs when a test failed.
#
# Environment: TEST_NGINX_BINARY (the nginx), TEST_NGINX_MODULE (our .so),
# TEST_NGINX_PRELOAD (load_module lines the nginx needs first, e.g. Debian's stream module),
# TEST_NGINX_LEAVE (keep the test directory), TEST_NGINX_VALGRIND (a folder: run nginx under
# valgrind memcheck, one log per process there; nginx-test/valgrind reads them).

use strict;
use warnings;

use Exporter 'import';
use File::Temp ();
use IO::Socket::INET;
use IO::Select;
use POSIX qw(WNOHANG);
use Test::More;
use Time::HiRes qw(time sleep);

our @EXPORT_OK = qw(client_hello tls_records http_get raw_exchange wait_for http_request
    read_until_closed echo_name echo_serves);

sub new {
    my ($class, %opts) = @_;
    my $dir = File::Temp::tempdir('edge-test-XXXXXX', TMPDIR => 1, CLEANUP => 0);
    # Workers run as an unprivileged user when nginx starts as root: they must read the routes.
    chmod 0755, $dir;
    return bless {
        dir => $dir,
        binary => $ENV{TEST_NGINX_BINARY} || die("TEST_NGINX_BINARY is not set\n"),
        module => $ENV{TEST_NGINX_MODULE} || die("TEST_NGINX_MODULE is not set\n"),
        ports => {},
        %opts,
    }, $class;
}

sub dir { $_[0]{dir} }

# A free TCP port on 127.0.0.1, the same one for the same name within a test. The kernel may
# hand out a port again once it is closed, and a port named for a server that is never
# started stays closed: no two names get the same port.
sub port {
    my ($self, $name) = @_;
    return $self->{ports}{$name} //= do {
        my %taken = map { $_ => 1 } grep { defined } values %{$self->{ports}};
        my $p;
        for (1 .. 100) {
            my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => '127.0.0.1', LocalPort => 0,
                Proto => 'tcp', ReuseAddr => 1) or die "no free port: $!\n";
            $p = $s->sockport;
            close $s;
            # Free for UDP too (QUIC listeners and peers).
            my $u = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $p, Proto => 'udp')
                or next;
            close $u;
            last unless $taken{$p};
        }
        die "no free port that is not taken already\n" if $taken{$p};
        $p;
    };
}

# Fills %%PORT_name%%, %%TESTDIR%% and %%MODULES%% in a template.
sub expand {
    my ($self, $text) = @_;
    my $modules = ($ENV{TEST_NGINX_PRELOAD} // '') . "load_module $self->{module};\n";
    $text =~ s/%%MODULES%%/$modules/g;
    $text =~ s/%%TESTDIR%%/$self->{dir}/g;
    $text =~ s/%%PORT_(\w+)%%/$self->port($1)/ge;
    return $text;
}

sub write_file {
    my ($self, $name, $content) = @_;
    my $path = "$self->{dir}/$name";
    open my $fh, '>', $path or die "$path: $!\n";
    print $fh $content;
    close $fh;
    chmod 0644, $path;
    return $path;
}

# Writes a route file atomically (temporary file, then rename), as operators are told to.
sub write_routes {
    my ($self, $name, $content) = @_;
    my ($sub, $base) = $name =~ m{^(.*/)?([^/]+)$};
    my $tmp = $self->write_file(($sub // '') . ".$base.tmp", $self->expand($content));
    rename $tmp, "$self->{dir}/$name" or die "rename: $!\n";
    return "$self->{dir}/$name";
}

# A self-signed certificate in the test folder: NAME.crt and NAME.key (readable by the
# workers), for CN $cn (default NAME). Returns the two paths.
sub certificate {
    my ($self, $name, $cn) = @_;
    my ($crt, $key) = map { "$self->{dir}/$name.$_" } qw(crt key);
    my $subject = '/CN=' . ($cn // $name);
    system("openssl req -x509 -newkey rsa:2048 -nodes -subj $subject -days 2 -keyout $key -out $crt >/dev/null 2>&1") == 0
        or die "openssl cannot make a certificate for $name\n";
    chmod 0644, $key;
    return ($crt, $key);
}

# A certificate authority in the test folder: NAME.crt and NAME.key. Returns the two paths.
sub ca {
    my ($self, $name) = @_;
    my ($crt, $key) = map { "$self->{dir}/$name.$_" } qw(crt key);
    system("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=$name -days 2 -keyout $key -out $crt "
        . "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign >/dev/null 2>&1") == 0
        or die "openssl cannot make the CA $name\n";
    return ($crt, $key);
}

# A server certificate NAME.crt/NAME.key signed by the CA $ca (its name), for the subject
# alternative names @san (e.g. 'IP:127.0.0.1', 'DNS:api.test'). Returns the two paths.
sub signed_certificate {
    my ($self, $ca, $name, @san) = @_;
    my $d = $self->{dir};
    my ($crt, $key) = map { "$d/$name.$_" } qw(crt key);
    my $ext = $self->write_file("$name.ext", "subjectAltName=" . join(',', @san) . "\n");
    system("openssl req -newkey rsa:2048 -nodes -subj /CN=$name -keyout $key -out $d/$name.csr >/dev/null 2>&1 && "
        . "openssl x509 -req -in $d/$name.csr -CA $d/$ca.crt -CAkey $d/$ca.key -CAcreateserial -days 2 "
        . "-extfile $ext -out $crt >/dev/null 2>&1") == 0
        or die "openssl cannot sign a certificate for $name\n";
    chmod 0644, $key;
    return ($crt, $key);
}

# A preloadable C shim (LD_PRELOAD) built from $source in the test's folder: its path. The
# script is skipped where there is no C compiler (the containers).
sub shim {
    my ($self, $name, $source) = @_;
    plan(skip_all => 'needs a C compiler for the shim') unless system('cc --version >/dev/null 2>&1') == 0;
    $self->write_file("$name.c", $source);
    system("cc -shared -fPIC -O2 -o $self->{dir}/$name.so $self->{dir}/$name.c -ldl") == 0
        or die "cannot build the shim $name\n";
    return "$self->{dir}/$name.so";
}

sub read_file {
    my ($self, $name) = @_;
    open my $fh, '<', "$self->{dir}/$name" or return '';
    local $/;
    return scalar <$fh>;
}

# The standard frame around a stream {} body; backends are `return` servers in it.
# Options: workers (1), connections (worker_connections, 1024).
sub config {
    my ($self, $stream, %opts) = @_;
    my $user = $> == 0 ? "user nobody nogroup;\n" : '';
    my $workers = $opts{workers} // 1;
    my $connections = $opts{connections} // 1024;
    my $conf = <<"EOF";
%%MODULES%%
${user}daemon off;
master_process on;
worker_processes $workers;
pid %%TESTDIR%%/nginx.pid;
error_log %%TESTDIR%%/error.log info;
events { worker_connections $connections; }
stream {
    log_format edge '\$remote_addr proto=\$edge_protocol name=\$edge_server_name route=\$edge_route upstream=\$edge_upstream alpn=\$edge_alpn addr=\$upstream_addr status=\$status match=\$edge_match source=\$edge_source';
    access_log %%TESTDIR%%/access.log edge;
$stream
}
EOF
    return $self->write_file('nginx.conf', $self->expand($conf));
}

# The Python that runs nginx-test/quic/peer.py: nginx-test/prereqs makes a virtualenv with
# aioquic in it. Undef when there is none.
sub quic_python {
    my $venv = $ENV{EDGE_VENV} // "$ENV{HOME}/.cache/nginx-edge/venv";
    my $python = "$venv/bin/python";
    return -x $python && system($python, '-c', 'import aioquic') == 0 ? $python : undef;
}

# nginx-test/quic/peer.py, beside this library.
sub quic_peer_script {
    (my $dir = __FILE__) =~ s{/[^/]+$}{};
    return "$dir/../../quic/peer.py";
}

# Starts a long-running peer of nginx-test/quic/peer.py (`server ...`, `relay ...`) and returns
# its pid once it printed "ready"; it is stopped with the test. Its errors go to peers.log.
sub quic_peer {
    my ($self, @args) = @_;
    my $python = quic_python() or die "quic_peer: no aioquic (nginx-test/prereqs)\n";
    pipe(my $r, my $w) or die "pipe: $!\n";
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        close $r;
        open STDOUT, '>&', $w;
        open STDERR, '>>', "$self->{dir}/peers.log";
        exec($python, quic_peer_script(), @args) or POSIX::_exit(127);
    }
    close $w;
    (<$r> // '') =~ /^ready/ or die "peer @args did not start: " . $self->read_file('peers.log');
    push @{$self->{peers}}, $pid;
    return $pid;
}

# `nginx -t`: returns (ok, output).
sub test_config {
    my ($self) = @_;
    my $d = $self->{dir};
    my $out = `$self->{binary} -t -p $d/ -c $d/nginx.conf -e $d/error.log 2>&1`;
    return ($? == 0, $out);
}

sub run {
    my ($self) = @_;
    my $conf = $self->read_file('nginx.conf');
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        open STDOUT, '>', "$self->{dir}/stdout.log";
        open STDERR, '>&', \*STDOUT;
        my @valgrind;
        if (my $logs = $ENV{TEST_NGINX_VALGRIND}) {
            (my $script = $0) =~ s{.*/}{};
            @valgrind = ('valgrind', '--tool=memcheck', '--leak-check=no', '--track-origins=yes',
                '--num-callers=30', "--log-file=$logs/$script.%p.log");
        }
        exec @valgrind, $self->{binary}, '-p', "$self->{dir}/", '-c', "$self->{dir}/nginx.conf",
            '-e', "$self->{dir}/error.log";
        exit 127;
    }
    $self->{pid} = $pid;
    for my $port (values %{$self->{ports}}) {
        # (A UDP listener cannot be probed by connecting.)
        next unless $conf =~ /listen\s+127\.0\.0\.1:$port\b(?![^;]*\budp\b)/;
        wait_for(sub {
            die "nginx exited:\n" . $self->read_file('stdout.log') . $self->read_file('error.log')
                if waitpid($pid, WNOHANG) == $pid;
            my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 1);
            close $s if $s;
            return $s;
        }, "nginx listening on $port");
    }
    return $self;
}

sub pid { $_[0]{pid} }

# `nginx -s reload`, waiting until every new worker runs and every old one has been told to
# leave (it has closed its listening sockets then, and takes no new connection).
sub reload {
    my ($self) = @_;
    my ($workers) = $self->read_file('nginx.conf') =~ /^\s*worker_processes\s+(\d+)\s*;/m;
    $workers //= 1;
    my $mark = length $self->read_file('error.log');
    my @old = $self->workers;
    kill 'HUP', $self->{pid};
    wait_for(sub {
        my $since = substr($self->read_file('error.log'), $mark);
        my @new = $since =~ /start worker process (\d+)/g;
        my %leaving = map { $_ => 1 } $since =~ /(\d+)#\d+: gracefully shutting down/g,
            $since =~ /worker process (\d+) exited/g;
        @new >= $workers && !grep { !$leaving{$_} } @old;
    }, 'new workers after reload, and the old ones leaving');
}

# The pids of the workers that run and have not been told to leave, from the error log.
sub workers {
    my ($self) = @_;
    my $log = $self->read_file('error.log');
    my %gone = map { $_ => 1 } $log =~ /(\d+)#\d+: (?:gracefully shutting down|exiting)/g,
        $log =~ /worker process (\d+) exited/g;
    return grep { !$gone{$_} } $log =~ /start worker process (\d+)/g;
}

# `nginx -s reload` that the master must refuse: waits for the message.
sub reload_fails_with {
    my ($self, $re) = @_;
    my $before = length $self->read_file('error.log');
    kill 'HUP', $self->{pid};
    wait_for(sub { substr($self->read_file('error.log'), $before) =~ $re }, "reload refused with $re");
}

sub stop {
    my ($self) = @_;
    my $pid = delete $self->{pid} or return;
    # At exit, the status of the test script, not of nginx.
    local $?;
    kill 'QUIT', $pid;
    my $deadline = time + 30;
    while (time < $deadline) {
        return if waitpid($pid, WNOHANG) == $pid;
        sleep 0.05;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
}

# Whether the script passed, noted before global destruction, when Test::More may be gone.
my $passed;
END { $passed = eval { Test::More->builder->is_passing } // 1 }

sub DESTROY {
    my ($self) = @_;
    $self->stop;
    $self->stop_backend($_) for keys %{$self->{backends} // {}};
    if (my @peers = @{delete $self->{peers} // []}) {
        local $?;
        kill 'TERM', @peers;
        waitpid($_, 0) for @peers;
    }
    my $late = ${^GLOBAL_PHASE} eq 'DESTRUCT';
    my $passing = $late ? $passed // 1 : Test::More->builder->is_passing;
    if ($passing && !$ENV{TEST_NGINX_LEAVE}) {
        File::Path::rmtree($self->{dir});
        return;
    }
    my $say = $late ? sub { print STDERR map { "# $_\n" } split /\n/, $_[0] } : \&diag;
    $say->("logs kept in $self->{dir}");
    $say->("error.log:\n" . $self->read_file('error.log')) unless $passing;
}

use File::Path ();

# Polls $cond until it returns true or the deadline (default 30 s) passes.
sub wait_for {
    my ($cond, $what, $timeout) = @_;
    my $deadline = time + ($timeout // 30);
    while (time < $deadline) {
        my $r = $cond->();
        return $r if $r;
        sleep 0.05;
    }
    die "timed out waiting for $what\n";
}

sub wait_for_log {
    my ($self, $re, $file) = @_;
    $file //= 'error.log';
    wait_for(sub { $self->read_file($file) =~ $re }, "$re in $file");
}

# Connects, sends @$chunks (pausing between them if asked), and returns what the peer sends
# until it closes.
sub raw_exchange {
    my ($port, $chunks, %opts) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 10,
        $opts{local} ? (LocalAddr => $opts{local}) : ()) or die "connect $port: $!\n";
    setsockopt($s, 6, 1, pack('l', 1));    # TCP_NODELAY: each chunk its own segment
    for my $chunk (@$chunks) {
        defined syswrite($s, $chunk) or last;
        sleep $opts{pause} if $opts{pause};
    }
    return read_until_closed($s, $opts{timeout} // 20);
}

# Everything the peer sends on $s until it closes (or $timeout seconds pass); closes $s.
sub read_until_closed {
    my ($s, $timeout) = @_;
    my $sel = IO::Select->new($s);
    my $out = '';
    my $deadline = time + $timeout;
    while (time < $deadline) {
        last unless $sel->can_read($deadline - time);
        my $n = sysread($s, my $buf, 65536);
        last unless $n;
        $out .= $buf;
    }
    close $s;
    return $out;
}

sub http_request {
    my ($host, %opts) = @_;
    my $head = "GET " . ($opts{target} // '/') . " HTTP/" . ($opts{version} // '1.1') . "\r\n";
    $head .= "Host: $host\r\n" if defined $host;
    return "$head\r\n";
}

sub http_get {
    my ($port, $host, %opts) = @_;
    return raw_exchange($port, [http_request($host, %opts)], %opts);
}

# Which `echo` backend a new connection through the edge on $port for $host reaches: what it
# wrote before echoing the request back (its name). Returns the name and the open socket.
sub echo_name {
    my ($port, $host) = @_;
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 10) or return ('', undef);
    print $s "GET / HTTP/1.1\r\nHost: $host\r\n\r\n";
    my $got = '';
    my $deadline = time + 10;
    while ($got !~ /GET/ && time < $deadline) {
        sysread($s, my $buf, 4096) or last;
        $got .= $buf;
    }
    $got =~ s/GET.*//s;
    return ($got, $s);
}

# Waits until new connections for $host on $port reach exactly the echo backends named in
# $want ("a1,a2": the names of 12 connections, sorted, the same in two runs in a row, since
# a table may change between two), then checks it. Returns the seconds it took.
sub echo_serves {
    my ($port, $host, $want, $what) = @_;
    my $began = time;
    my $last = '';
    my $names = sub { my %seen; $seen{(echo_name($port, $host))[0]}++ for 1 .. 12; join ',', sort keys %seen };
    wait_for(sub { my $now = $names->(); my $ok = $now eq $want && $last eq $want; $last = $now; $ok },
        "$what ($want)", 60);
    Test::More::is($last, $want, $what);
    return time - $began;
}

# A backend that a test can stop and start again: a child process listening on
# $opts{addr} (127.0.0.1) port $opts{port} (PORT_$name). Modes:
#   text  writes its name and closes (after the client's bytes, if any, have arrived);
#   hold  writes its name and keeps the connection until the client closes it;
#   echo  writes its name, then sends back what it receives, until the client closes;
#   silent  accepts and never writes, until the client closes;
#   http  answers one request with status $opts{status} (200) and its name as the body;
#   tls   completes a TLS handshake ($opts{cert}, $opts{key}), then writes its name.
# With $opts{log}, each accepted connection appends a line to that file in the test folder.
# Stopping (SIGTERM) takes the connections the kernel has already accepted, then stops
# listening, so that later connects are refused rather than reset.
sub backend {
    my ($self, $name, %o) = @_;
    my $port = $o{port} // $self->port($name);
    my $addr = $o{addr} // '127.0.0.1';
    my $listen = IO::Socket::INET->new(Listen => 128, LocalAddr => $addr, LocalPort => $port,
        Proto => 'tcp', ReuseAddr => 1) or die "backend $name on $addr:$port: $!\n";
    $o{log} = "$self->{dir}/$o{log}" if $o{log};
    my $pid = fork() // die "fork: $!\n";
    if ($pid == 0) {
        _serve($listen, $name, %o);
        POSIX::_exit(0);
    }
    close $listen;
    $self->{backends}{$name} = $pid;
    return $port;
}

sub stop_backend {
    my ($self, $name) = @_;
    my $pid = delete $self->{backends}{$name} or return;
    kill 'TERM', $pid;
    waitpid($pid, 0);
}

sub _serve {
    my ($listen, $name, %o) = @_;
    my $mode = $o{mode} // 'text';
    my $stop = 0;
    local $SIG{TERM} = sub { $stop = 1 };
    local $SIG{PIPE} = 'IGNORE';
    $listen->blocking(0);
    my $sel = IO::Select->new($listen);
    my (%buf, %answered);
    my $answer = sub {
        my ($c) = @_;
        if ($mode eq 'http') {
            my $status = $o{status} // 200;
            syswrite($c, "HTTP/1.0 $status X\r\nContent-Length: " . length($name)
                . "\r\nConnection: close\r\n\r\n$name");
        } else {
            syswrite($c, $name);
        }
        $answered{fileno $c} = 1;
        # FIN after the answer; the socket is closed once the peer closes its side, so that
        # unread bytes never turn the close into a reset.
        shutdown($c, 1) unless $mode eq 'hold' || $mode eq 'echo';
    };
    my $accept = sub {
        while (my $c = $listen->accept) {
            if ($o{log} && open my $log, '>>', $o{log}) { print {$log} "accept\n"; close $log }
            $c->blocking(0);
            if ($mode eq 'tls') {
                require IO::Socket::SSL;
                $c->blocking(1);
                my $ok = IO::Socket::SSL->start_SSL($c, SSL_server => 1, Timeout => 5,
                    SSL_cert_file => $o{cert}, SSL_key_file => $o{key});
                if ($ok) { print {$c} $name; $c->close(SSL_fast_shutdown => 1); }
                else { close $c }
                next;
            }
            $buf{fileno $c} = '';
            $sel->add($c);
            $answer->($c) if $mode eq 'text' || $mode eq 'hold' || $mode eq 'echo';
        }
    };
    while (1) {
        if ($stop) {
            $accept->();
            $sel->remove($listen);
            close $listen;
            last;
        }
        for my $fh ($sel->can_read(0.05)) {
            if ($fh == $listen) { $accept->(); next }
            my $n = sysread($fh, my $chunk, 65536);
            if (!$n) {
                delete $buf{fileno $fh};
                delete $answered{fileno $fh};
                $sel->remove($fh);
                close $fh;
                next;
            }
            $buf{fileno $fh} .= $chunk;
            syswrite($fh, $chunk) if $mode eq 'echo';
            $answer->($fh) if $mode eq 'http' && !$answered{fileno $fh} && $buf{fileno $fh} =~ /\r\n\r\n/;
        }
    }
    # Let the accepted connections finish (their peers close them), for a few seconds at most.
    my $deadline = time + 5;
    while ($sel->count && time < $deadline) {
        for my $fh ($sel->can_read(0.05)) {
            my $n = sysread($fh, my $chunk, 65536);
            if (!$n) { $sel->remove($fh); close $fh; next }
            $buf{fileno $fh} .= $chunk;
            $answer->($fh) if $mode eq 'http' && !$answered{fileno $fh} && $buf{fileno $fh} =~ /\r\n\r\n/;
        }
    }
}

# GET $path from an edge_status listener: (status code, body).
sub status_get {
    my ($port, $path) = @_;
    my $r = raw_exchange($port, ["GET $path HTTP/1.1\r\nHost: localhost\r\n\r\n"]);
    my ($head, $body) = split /\r\n\r\n/, $r, 2;
    my ($code) = ($head // '') =~ m{^HTTP/1\.1 (\d{3}) };
    return ($code // 0, $body // '');
}

# The edge_status JSON at $path (default /status), decoded.
sub status_json {
    my ($port, $path) = @_;
    $path //= '/status';
    require JSON::PP;
    my ($code, $body) = status_get($port, $path);
    die "$path answered $code\n" unless $code == 200;
    return JSON::PP::decode_json($body);
}

# A route's entry in /routes (the first $top routes), or undef.
sub route_counters {
    my ($port, $name, $top) = @_;
    my $routes = status_json($port, '/routes?top=' . ($top // 100000))->{routes};
    my ($r) = grep { $_->{route} eq $name } @$routes;
    return $r;
}

# Writes route file $file and waits until $workers workers serve the table made from it: that
# many running workers say they put a table in service after the write. Not after a reload:
# a new worker may then say so, after the write, of the table it started with (table numbers
# start again in a new cycle, so they cannot tell which), and the wait would end early.
sub swap_routes {
    my ($self, $file, $text, $workers) = @_;
    my $log = $self->read_file('error.log');
    die "swap_routes after a reload cannot tell the new table from the one a new worker starts with\n"
        if $log =~ /: reconfiguring$/m;
    my $mark = length $log;
    $self->write_routes($file, $text);
    wait_for(sub {
        my %pids = map { $_ => 1 } substr($self->read_file('error.log'), $mark)
            =~ /(\d+)#\d+: edge_routes: .* table \d+ in service/g;
        keys %pids >= $workers;
    }, "$workers worker(s) to serve the new table", 120);
}

# A server's entry in the status JSON.
sub server_state {
    my ($port, $upstream, $address) = @_;
    my $st = status_json($port);
    my ($s) = grep { $_->{address} eq $address } @{$st->{upstreams}{$upstream}{servers} // []};
    return $s;
}

# A TLS ClientHello handshake message. `pad` adds a padding extension to reach the size of
# post-quantum hellos.
sub client_hello {
    my (%o) = @_;
    my $ext = '';
    if (defined $o{sni}) {
        my $n = $o{sni};
        $ext .= pack('n n n C n a*', 0, length($n) + 5, length($n) + 3, 0, length($n), $n);
    }
    if ($o{alpn}) {
        my $list = join '', map { pack('C a*', length $_, $_) } @{$o{alpn}};
        $ext .= pack('n n n a*', 16, length($list) + 2, length($list), $list);
    }
    $ext .= pack('n n C n', 43, 3, 2, 0x0304);    # supported_versions: TLS 1.3
    $ext .= pack('n n a*', 21, $o{pad}, "\0" x $o{pad}) if $o{pad};
    my $body = pack('n', 0x0303) . ("\x07" x 32) . pack('C', 32) . ("\x09" x 32)
        . pack('n n n', 4, 0x1301, 0x1302) . pack('C C', 1, 0)
        . pack('n', length $ext) . $ext;
    return pack('C', 1) . substr(pack('N', length $body), 1) . $body;
}

# Wraps a handshake message into TLS records of at most $size bytes each.
sub tls_records {
    my ($msg, $size) = @_;
    $size //= 16384;
    my $out = '';
    for (my $i = 0; $i < length $msg; $i += $size) {
        my $part = substr($msg, $i, $size);
        $out .= pack('C n n', 22, 0x0301, length $part) . $part;
    }
    return $out;
}

1;
